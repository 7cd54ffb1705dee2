"""Gemma 4 (E2B/E4B) audio: waveform -> log-mel features -> conformer tower -> soft tokens, from scratch.

Imports nothing from transformers; follows HF eager dtype by dtype (float32 and bfloat16 bit-exact in
``tests/test_audio.py``). Citations: ``m4:N`` = ``transformers/models/gemma4/modeling_gemma4.py`` line N,
``fe4:N`` = ``feature_extraction_gemma4.py``, ``pr4:N`` = ``processing_gemma4.py``, ``c4:N`` =
``configuration_gemma4.py``, ``au:N`` = ``transformers/audio_utils.py``, ``fs:N`` =
``feature_extraction_sequence_utils.py``, ``mk:N`` = ``masking_utils.py`` (transformers 5.23).

Shapes: B clips, T mel frames, M mel bins, T' = T/4 tower frames, H tower hidden, N heads, D head dim,
U blocks of W = chunk frames, C = context frames per block, P relative positions.

::

    waveform ─ log_mel_features ─▶ (T, M) features, (T,) mask           [numpy, as HF]
    features ─ 2×[mask · conv3x3/2 · LayerNorm(C) · ReLU] ─ flatten ─ Linear ─▶ audio.embed   (B, T', H)
      ─ L × conformer ─▶ audio.layers.{i}.out ─ output_proj (+bias) ─▶ audio.out  (B, T', O)
      ─ embed_audio = Linear(RMSNorm_noscale) ─▶ audio.proj (B, T', H_text) ─ [valid frames] ─▶ soft tokens

    conformer layer:  x ─ FFN½ ─┬─ clamp ─ norm ─ attention ─ clamp ─ norm ─(+)─ LightConv ─ FFN½ ─ clamp ─ norm_out
                                └─────────────────────────────────────────┘
    FFN½:      x + ½·post_norm(clamp(W2 act(W1 pre_norm(clamp(x)))))
    LightConv: x + W_end act(conv_norm(clamp(causal_depthwise_conv(GLU(W_start pre_norm(x))))))

Probes (``capture`` dict, each (clips, frames, features)): ``audio.embed``, ``audio.layers.{i}.out``,
``audio.out``, ``audio.proj`` (the same names for :class:`Gemma3nAudioTower`, whose notes are in its section). :meth:`Gemma4AudioTower.layer`, :meth:`~Gemma4AudioTower.output` and
:meth:`~Gemma4AudioTower.project_from` rerun one stage on a given input.

Numerics facts (each checked against the source):

Features (``Gemma4AudioFeatureExtractor``):
  - waveform truncated to 480000 samples, right-padded with 0 to a multiple of 128, cast to float32 after
    padding (fe4:273-280, fs:187-219, fs:255-294, fs:327-335); a sample mask marks the real samples.
  - semicausal left pad of frame_length // 2 = 160 zeros (fe4:179-183); frames of 321 samples every 160,
    the last sample dropped when preemphasis is 0 (fe4:185-198); float32 periodic Hann window
    (``np.hanning(321)[:-1]``, fe4:141, au:882-925); ``np.fft.rfft(n=512)`` of float32 frames (complex64),
    ``abs`` (float32) @ float64 HTK mel filters (no norm, 0-8000 Hz, au:770-866) -> float64,
    ``log(mel + 1e-3)`` in float64 (fe4:200-208), per-bin mean/stddev if configured (fe4:210-214),
    cast to float32 (fe4:286), then times the frame mask (fe4:289).
  - frame mask: frame i is real iff the padded sample mask at its window's last sample
    i*160 + 320 is 1 (fe4:218-223).
  - a single 1-D ndarray crashes HF's ``__call__`` (fe4:271 wraps it as (1, N), fe4:285 transposes it,
    fe4:216 ``squeeze(0)`` fails); pass ``[waveform]``.
Soft-token count (``Gemma4Processor._compute_audio_num_tokens``, pr4:316-354): mel frames
  ``(n + 160 - 321) // 160 + 1`` (0 if <= 0), two ``(t + 2 - 3) // 2 + 1``, capped at ``audio_seq_length``
  750; equals the tower's valid-frame count (the mask path of ``replace_audio_token``, pr4:222-233)
  because the valid frames form a prefix. Not the documented ``ceil(ms / 40)`` (pr4:112-114): 16001
  samples give 25 tokens, not 26; ``audio_ms_per_token`` is stored and unused (pr4:135).
Subsampling (m4:362-417): features ``* mask`` in the input dtype, then cast to the conv dtype
  (m4:378-381); ``Conv2d(3x3, stride 2, pad 1, no bias)``; ``LayerNorm(channels, no bias,
  eps=config.rms_norm_eps)`` on the channels-last view (m4:373, m4:382); ReLU; mask ``[:, ::2]``
  (m4:385); flatten (freq, channel) channel-innermost (m4:416); ``input_proj_linear`` (no bias). Its
  input width is ``(channels[0] // 4) * channels[1]`` (m4:403), so #mel bins must equal channels[0].
Relative positions (m4:225-253): ``inv_timescales = exp(arange(H/2) * -ln(1e4)/(H/2 - 1))`` in float32
  (m4:241-244), cast to the model dtype like any buffer (``from_pretrained(dtype=bf16)`` and
  ``.to(bf16)`` agree; ``_from_config(dtype=bf16)`` computes it *in* bf16 under the default dtype and
  differs by up to 5e-4); offsets ``arange(C//2, -1, -1)`` times it in that dtype, ``[sin, cos]``, cast to
  the hidden dtype (m4:249-253).
Attention (m4:256-359), all in float32 after the projections:
  - q, k, v = ClippableLinear(x) in the model dtype, then ``.float()`` (m4:321-323).
  - ``q * (D^-0.5 / ln 2) * softplus(per_dim_scale)``: the softplus runs in the parameter dtype (bf16),
    the products in float32 (m4:267, m4:325); ``k * ln(1+e)/ln 2`` (m4:268, m4:326).
  - q into blocks of W (zero-padded, m4:285-291); k, v into overlapping contexts of
    C = W + (left-1) + right frames, zero-padded left by left-1 and right by right + W - 1
    (m4:293-301).
  - ``relative_k_proj`` (no clip) on the position embeddings in the hidden dtype, then float32 (m4:333-335);
    Transformer-XL ``_rel_shift`` by pad / flatten / slice (m4:303-310, m4:337-341).
  - logits ``tanh((ac + bd) / cap) * cap`` in float32 with ``cap`` a buffer in the model dtype
    (m4:283, m4:343-348); masked positions set to ``attention_invalid_logits_value`` -1e9 (not the
    docstring's 1e-9, c4:43 vs c4:70) (m4:350-351); softmax in float32 (m4:353).
  - output rows ``[:, :T]``, cast to the hidden dtype, ``post`` ClippableLinear (m4:355-357).
Attention mask (m4:2028-2043, m4:1947-1960, m4:1995-2020, mk:1032-1125): key k is visible from query q iff
  ``valid[k]`` and ``0 <= q - k < left - 1`` or ``0 < k - q < right``: with the released left = 13 only
  self + 11 past frames, although each context holds 12 past frames and the relative table has offset 12
  (the left window is ``attention_context_left - 1`` = 12 keys including self, m4:2037); with right = R
  only R - 1 future frames. Padding queries are not masked; padded rows beyond T are fully masked.
Clipping: ``Gemma4ClippableLinear`` clamps input and output to checkpoint buffers (m4:175-201), in the
  model dtype (the buffers are cast with the model). ``gradient_clipping`` (1e10) clamps are
  ``min(gc, finfo(dtype).max)`` (m4:437, m4:520, m4:554).
Norms: ``Gemma4RMSNorm`` = ``x * pow(mean(x^2) + eps, -0.5) * w`` in float32, one cast back (m4:204-222).
  The FFN norms and the layer's three norms use the class default eps 1e-6 and ignore
  ``config.rms_norm_eps`` (m4:428-429, m4:540-542); only the LightConv norms (m4:504-505), the
  subsampling LayerNorms and the embedder (m4:2134) read it.
FFN (m4:420-452): residual weight ``config.residual_weight`` (0.5) on the post-normed branch (m4:449).
LightConv (m4:456-527): GLU on the last dim (m4:515); depthwise conv1d (groups=H, no bias) with a causal
  left pad of kernel-1 (m4:470-473); clamp, ``conv_norm``, act, ``linear_end``, + residual. The conv
  output is used as the transposed (non-contiguous) view (m4:517): the norm's reduction over that layout
  rounds differently in float32 from a contiguous copy, so the reference keeps the view.
Layer (m4:530-578): as the diagram; ``+= residual`` after ``norm_post_attn``.
Output (m4:1988, m4:2048): ``output_proj`` Linear with bias. ``embed_audio`` (m4:2123-2147):
  scale-free RMSNorm(eps = audio ``rms_norm_eps``) then ``embedding_projection`` (no bias). The merge
  keeps ``proj[mask]`` (valid frames, clip-major) (m4:2443-2450).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .ops import put as _put


class AudioWeightError(ValueError):
    """A checkpoint that does not fit the audio tower; the message names the tensor."""


# ---------------------------------------------------------------------------------------------------
# Features: waveform -> log-mel (numpy, HF's exact op sequence)
# ---------------------------------------------------------------------------------------------------

FEATURE_DEFAULTS = {  # Gemma4AudioFeatureExtractor.__init__ / __call__ defaults (fe4:95-113, fe4:221-230)
    "feature_size": 128,
    "frame_length_ms": 20.0,
    "hop_length_ms": 10.0,
    "min_frequency": 0.0,
    "max_frequency": 8000.0,
    "preemphasis": 0.0,
    "preemphasis_htk_flavor": True,
    "fft_overdrive": False,
    "dither": 0.0,
    "input_scale_factor": 1.0,
    "mel_floor": 1e-3,
    "per_bin_mean": None,
    "per_bin_stddev": None,
    "max_length": 480_000,
    "pad_to_multiple_of": 128,
    "audio_seq_length": 750,  # processor cap (pr4:102)
}


def _settings(config: Mapping | None) -> dict:
    out = dict(FEATURE_DEFAULTS)
    out.update({k: v for k, v in (config or {}).items() if k in FEATURE_DEFAULTS})
    return out


def _frame_geometry(sampling_rate: int, cfg: dict) -> tuple[int, int, int]:
    """(frame_length, hop_length, fft_length) in samples (fe4:131-136)."""
    frame = int(round(sampling_rate * cfg["frame_length_ms"] / 1000.0))
    hop = int(round(sampling_rate * cfg["hop_length_ms"] / 1000.0))
    fft = 2 ** math.ceil(math.log2(frame)) * (2 if cfg["fft_overdrive"] else 1)
    return frame, hop, fft


def _htk_mel_filters(n_freqs: int, n_mels: int, f_min: float, f_max: float, sampling_rate: int) -> np.ndarray:
    """(n_freqs, n_mels) float64 triangular HTK filters, no normalisation (au:580-598, au:616-634, au:673-692, au:770-866)."""
    to_mel = lambda f: 2595.0 * np.log10(1.0 + (f / 700.0))  # noqa: E731
    mel = np.linspace(to_mel(f_min), to_mel(f_max), n_mels + 2)
    centres = 700.0 * (np.power(10, mel / 2595.0) - 1.0)
    fft_freqs = np.linspace(0, sampling_rate // 2, n_freqs)
    diff = np.diff(centres)
    slopes = np.expand_dims(centres, 0) - np.expand_dims(fft_freqs, 1)
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    return np.maximum(np.zeros(1), np.minimum(down, up))


def _padded_waveform(waveform, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """Truncate, right-pad to a multiple, cast float64 to float32 (fs:187-219, fs:255-294, fs:296-335): (wave, sample mask)."""
    wave = np.asarray(waveform)
    if wave.ndim != 1:
        raise ValueError(f"waveform must be 1-D (samples,), got shape {wave.shape}")
    max_len, multiple = cfg["max_length"], cfg["pad_to_multiple_of"]
    if max_len is not None:
        if multiple and max_len % multiple:
            max_len = (max_len // multiple + 1) * multiple
        wave = wave[:max_len]
    n = len(wave)
    target = n if not multiple or n % multiple == 0 else (n // multiple + 1) * multiple
    mask = np.pad(np.ones(n, dtype=np.int32), (0, target - n))
    wave = np.pad(wave, (0, target - n), "constant", constant_values=0.0)
    if wave.dtype == np.float64:
        wave = wave.astype(np.float32)
    return wave, mask


def log_mel_features(waveform, sampling_rate: int = 16000, config: Mapping | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One waveform (samples,) -> features (frames, mels) float32, mask (frames,) bool, as HF's
    ``Gemma4AudioFeatureExtractor()([waveform])`` gives them. ``config``: feature-extractor settings that
    differ from :data:`FEATURE_DEFAULTS` (``preprocessor_config.json`` keys). Dither is not supported."""
    cfg = _settings(config)
    if cfg["dither"]:
        raise ValueError("dither > 0 is random in HF and not reproduced")
    frame, hop, fft = _frame_geometry(sampling_rate, cfg)
    wave, sample_mask = _padded_waveform(waveform, cfg)
    wave = wave[None]  # (1, N)
    if cfg["input_scale_factor"] != 1.0:
        wave = wave * cfg["input_scale_factor"]
    pad_left = frame // 2  # semicausal (fe4:179-183)
    wave = np.pad(wave, ((0, 0), (pad_left, 0)), mode="constant")
    sample_mask = np.pad(sample_mask, (pad_left, 0), mode="constant", constant_values=0)

    size = frame + 1
    frames = _preemphasised_frames(wave, frame, hop, cfg)
    n_frames = frames.shape[1]

    window = np.hanning(frame + 1)[:-1].astype(np.float32)  # periodic Hann (au:912-925, fe4:141)
    mel_filters = _htk_mel_filters(fft // 2 + 1, cfg["feature_size"], cfg["min_frequency"], cfg["max_frequency"], sampling_rate)
    magnitude = np.abs(np.fft.rfft(frames * window, n=fft, axis=-1))
    log_mel = np.log(np.matmul(magnitude, mel_filters) + np.array(cfg["mel_floor"], dtype=np.float64))
    if cfg["per_bin_mean"] is not None:
        log_mel = log_mel - np.array(cfg["per_bin_mean"]).reshape(1, 1, -1)
    if cfg["per_bin_stddev"] is not None:
        log_mel = log_mel / np.array(cfg["per_bin_stddev"]).reshape(1, 1, -1)
    features = log_mel.squeeze(0).astype(np.float32)

    mask = sample_mask[np.arange(n_frames) * hop + size - 1].astype(bool)
    features = features * mask[..., None]
    return torch.from_numpy(np.ascontiguousarray(features)), torch.from_numpy(mask)


def batch_features(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-clip (features, mask) -> (B, T, M), (B, T) padded with zeros / False to the longest: what HF's
    extractor gives for the list of waveforms (its extra frames are masked and zeroed, fe4:289)."""
    t = max(f.shape[0] for f, _ in items)
    feats = torch.stack([F.pad(f, (0, 0, 0, t - f.shape[0])) for f, _ in items])
    masks = torch.stack([F.pad(m, (0, t - m.shape[0]), value=False) for _, m in items])
    return feats, masks


def soft_token_count(num_samples: int, config: Mapping | None = None, sampling_rate: int = 16000) -> int:
    """Audio soft tokens of a waveform of ``num_samples`` samples: HF ``Gemma4Processor`` rule (pr4:316-354),
    the number of frames the tower marks valid, capped at ``audio_seq_length`` (750 = 30 s)."""
    cfg = _settings(config)
    frame, hop, _ = _frame_geometry(sampling_rate, cfg)
    frames = (num_samples + frame // 2 - (frame + 1)) // hop + 1
    if frames <= 0:
        return 0
    for _ in range(2):  # two stride-2, kernel-3, pad-1 convolutions
        frames = (frames + 2 - 3) // 2 + 1
    return min(frames, cfg["audio_seq_length"])


# Gemma 3n features (``fe3n:N`` = ``transformers/models/gemma3n/feature_extraction_gemma3n.py`` line N).
# Same padding (fs), frame geometry, unfold + preemphasis + rfft + |.| @ mel + per-bin norm sequence as
# Gemma 4, but (each checked against the source):
#   - defaults: 32 ms frames (512 samples), fft_overdrive -> rfft n=1024, mel 125-7600 Hz,
#     preemphasis 0.97 (HTK flavour), mel_floor 1e-5, dither 0.0 (fe3n:154-172, fe3n:189-196);
#   - no semicausal left pad: frame i covers samples i*hop .. i*hop + frame (fe3n:233-236);
#   - Hann window 0.5*(1 - cos(2*pi*n/N)) evaluated in float32 (fe3n:198-200), not np.hanning(N+1)[:-1];
#   - mel filters from its own ``create_fb_matrix`` (fe3n:28-86, fe3n:202-210): float32 frequency grid
#     ``arange(n_freqs) * (sr / fft)``, ``math.log10`` for the band edges, otherwise HTK as audio_utils;
#   - ``log(max(mel, floor))`` (fe3n:254), not ``log(mel + floor)``;
#   - frame mask = the padded sample mask at each frame's FIRST sample, ``mask[::hop][:T]``
#     (fe3n:263-265), so a frame that runs into the padding counts as real;
#   - features are NOT multiplied by the mask (no fe4:289 counterpart; fe3n:320-330);
#   - a bare 1-D array works (fe3n:302-309 wraps it).
# Batching changes a clip's features: HF frames every clip of a batch from the waveform padded to the
# longest one (fs:199-214), so a short clip gets more frames, some still over real audio and masked True.

FEATURE_DEFAULTS_3N = {  # Gemma3nAudioFeatureExtractor.__init__ / __call__ defaults (fe3n:154-172, fe3n:267-276)
    "feature_size": 128,
    "frame_length_ms": 32.0,
    "hop_length_ms": 10.0,
    "min_frequency": 125.0,
    "max_frequency": 7600.0,
    "preemphasis": 0.97,
    "preemphasis_htk_flavor": True,
    "fft_overdrive": True,
    "dither": 0.0,
    "input_scale_factor": 1.0,
    "mel_floor": 1e-5,
    "per_bin_mean": None,
    "per_bin_stddev": None,
    "max_length": 480_000,
    "pad_to_multiple_of": 128,
}


def _settings_3n(config: Mapping | None) -> dict:
    return {**FEATURE_DEFAULTS_3N, **{k: v for k, v in (config or {}).items() if k in FEATURE_DEFAULTS_3N}}


def _hann_3n(frame: int) -> np.ndarray:
    """(frame,) float32 periodic Hann, computed in float32 as fe3n:198-200."""
    n = np.arange(frame, dtype=np.float32)
    return (0.5 * (1 - np.cos(2 * np.pi * n / frame))).astype(np.float32)


def _fb_matrix_3n(n_freqs: int, n_mels: int, f_min: float, f_max: float, sampling_rate: int, fft: int) -> np.ndarray:
    """(n_freqs, n_mels) float64 HTK triangles, no norm, HF's ``create_fb_matrix`` (fe3n:63-79)."""
    freqs = np.arange(n_freqs, dtype=np.float32) * (sampling_rate / fft)  # float32 grid (fe3n:63)
    edges = [2595.0 * math.log10(1.0 + (f / 700.0)) for f in (f_min, f_max)]  # math.log10 (fe3n:67-68)
    centres = 700.0 * (10 ** (np.linspace(*edges, n_mels + 2) / 2595.0) - 1.0)
    diff = centres[1:] - centres[:-1]
    slopes = np.expand_dims(centres, 0) - np.expand_dims(freqs, 1)
    down = (-1.0 * slopes[:, :-2]) / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    return np.maximum(np.zeros(1, dtype=np.float32), np.minimum(down, up))


def _preemphasised_frames(wave: np.ndarray, frame: int, hop: int, cfg: dict) -> np.ndarray:
    """(1, N) -> (1, F, frame): windows of frame + 1 samples every hop (fe3n:89-105, fe4:185-188), first
    sample only feeding the preemphasis, HTK flavour or not, or dropped when it is 0 (fe3n:238-246,
    fe4:190-198; the two files agree)."""
    size = frame + 1
    n_frames = (wave.shape[1] - size) // hop + 1
    if n_frames <= 0:
        windows = np.zeros((1, 0, size), dtype=wave.dtype)
    else:
        windows = np.lib.stride_tricks.as_strided(
            wave, shape=(1, n_frames, size), strides=(wave.strides[0], wave.strides[1] * hop, wave.strides[1]))
    pre = cfg["preemphasis"]
    if pre <= 0.0:
        return windows[..., :-1]
    if cfg["preemphasis_htk_flavor"]:
        return np.concatenate([windows[..., :1] * (1.0 - pre), windows[..., 1:-1] - pre * windows[..., :-2]], axis=-1)
    return windows[..., 1:] - pre * windows[..., :-1]


def log_mel_features_3n(waveform, sampling_rate: int = 16000, config: Mapping | None = None, *,
                        pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One clip (samples,) -> features (T, M) float32, mask (T,) bool (True = real frame), as HF's
    ``Gemma3nAudioFeatureExtractor(**config)([waveform])`` gives them. ``config``: settings that differ from
    :data:`FEATURE_DEFAULTS_3N`. ``pad_to``: frame the clip as one of a batch whose longest clip has this
    many samples (see :func:`batch_features_3n`). Dither is not supported (random in HF, fe3n:227-228)."""
    cfg = _settings_3n(config)
    if cfg["dither"]:
        raise ValueError("dither > 0 is random in HF and not reproduced")
    frame, hop, fft = _frame_geometry(sampling_rate, cfg)  # fe3n:189-196, the same rule as fe4:130-137
    wave, sample_mask = _padded_waveform(waveform, cfg)
    if pad_to is not None:  # the batch's common length, itself rounded up to the multiple (fs:199-214, fs:263-264)
        target = _padded_waveform(np.zeros(pad_to, dtype=np.float32), cfg)[0].shape[0]
        wave = np.pad(wave, (0, max(target - len(wave), 0)))
        sample_mask = np.pad(sample_mask, (0, max(target - len(sample_mask), 0)))
    wave = wave[None]  # (1, N)
    if cfg["input_scale_factor"] != 1.0:
        wave = wave * cfg["input_scale_factor"]  # fe3n:230-231
    frames = _preemphasised_frames(wave, frame, hop, cfg) * _hann_3n(frame)  # fe3n:248
    magnitude = np.abs(np.fft.rfft(frames, n=fft, axis=-1))  # complex64 -> float32 (fe3n:249-251)
    mel = np.matmul(magnitude, _fb_matrix_3n(fft // 2 + 1, cfg["feature_size"], cfg["min_frequency"],
                                             cfg["max_frequency"], sampling_rate, fft))  # float64 (fe3n:253)
    log_mel = np.log(np.maximum(mel, np.array(cfg["mel_floor"], dtype=np.float64)))  # fe3n:191, fe3n:254
    if cfg["per_bin_mean"] is not None:
        log_mel = log_mel - np.array(cfg["per_bin_mean"]).reshape(1, 1, -1)  # fe3n:212-213, fe3n:256-257
    if cfg["per_bin_stddev"] is not None:
        log_mel = log_mel / np.array(cfg["per_bin_stddev"]).reshape(1, 1, -1)  # fe3n:217-218, fe3n:259-260
    features = log_mel.squeeze(0).astype(np.float32)  # fe3n:262, fe3n:324
    mask = sample_mask[::hop][: features.shape[0]].astype(bool)  # frame START sample (fe3n:263-265)
    return torch.from_numpy(np.ascontiguousarray(features)), torch.from_numpy(np.ascontiguousarray(mask))


def batch_features_3n(waveforms, sampling_rate: int = 16000, config: Mapping | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Several clips (1-D arrays) -> (B, T, M) float32, (B, T) bool: HF's
    ``Gemma3nAudioFeatureExtractor(**config)(waveforms)``. HF right-pads every waveform with 0 to the longest
    (after truncation) rounded up to ``pad_to_multiple_of`` (fs:199-214, fs:263-294), then frames each padded
    waveform (fe3n:320-325), so all rows have the same T and no padding of features is needed; but a clip's
    row is NOT its :func:`log_mel_features_3n` alone padded: it has more frames, the first ones past its
    own padded end still over real audio and masked True (the mask is taken at frame starts), the rest
    log(mel_floor)-valued (not zeroed) and masked False. So this takes waveforms, not per-clip features."""
    longest = max(len(_padded_waveform(w, _settings_3n(config))[0]) for w in waveforms)
    items = [log_mel_features_3n(w, sampling_rate, config, pad_to=longest) for w in waveforms]
    return torch.stack([f for f, _ in items]), torch.stack([m for _, m in items])


# ---------------------------------------------------------------------------------------------------
# Tower
# ---------------------------------------------------------------------------------------------------

_AUDIO_DEFAULTS = {  # Gemma4AudioConfig defaults (c4:50-73)
    "hidden_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 8, "hidden_act": "silu",
    "subsampling_conv_channels": [128, 32], "conv_kernel_size": 5, "residual_weight": 0.5,
    "attention_chunk_size": 12, "attention_context_left": 13, "attention_context_right": 0,
    "attention_logit_cap": 50.0, "attention_invalid_logits_value": -1.0e9, "use_clipped_linears": True,
    "rms_norm_eps": 1e-6, "gradient_clipping": 1e10, "output_proj_dims": 1536,
}


@dataclass(frozen=True)
class AudioSpec:
    hidden: int
    layers: int
    heads: int
    act: str
    channels: tuple[int, int]
    conv_kernel: int
    residual_weight: float
    chunk: int
    left: int  # attention_context_left (includes the query frame)
    right: int
    logit_cap: float
    invalid_logit: float
    clipped: bool
    eps: float
    grad_clip: float
    out_dims: int
    text_hidden: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def context(self) -> int:
        """C: frames of keys per block (m4:277-280)."""
        return self.chunk + self.left - 1 + self.right

    @classmethod
    def from_hf(cls, hf_config) -> AudioSpec:
        cfg = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        audio, text = cfg.get("audio_config"), cfg.get("text_config")
        if audio is None:
            raise ValueError("config has no audio_config (only Gemma 4 E2B/E4B carry an audio tower)")
        if text is None or "hidden_size" not in text:
            raise ValueError("config has no text_config.hidden_size (needed for the embed_audio projector)")
        a = {**_AUDIO_DEFAULTS, **{k: v for k, v in audio.items() if v is not None}}
        return cls(
            hidden=a["hidden_size"], layers=a["num_hidden_layers"], heads=a["num_attention_heads"], act=a["hidden_act"],
            channels=tuple(a["subsampling_conv_channels"]), conv_kernel=a["conv_kernel_size"],
            residual_weight=a["residual_weight"], chunk=a["attention_chunk_size"], left=a["attention_context_left"],
            right=a["attention_context_right"], logit_cap=a["attention_logit_cap"],
            invalid_logit=a["attention_invalid_logits_value"], clipped=a["use_clipped_linears"], eps=a["rms_norm_eps"],
            grad_clip=a["gradient_clipping"], out_dims=a["output_proj_dims"], text_hidden=text["hidden_size"],
        )


_ACTS = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _act(name: str):
    if name not in _ACTS:
        raise ValueError(f"unsupported audio hidden_act {name!r}")
    return _ACTS[name]


def _clamp(x: torch.Tensor, limit: float) -> torch.Tensor:
    """The ``gradient_clipping`` clamp: ±min(limit, finfo(dtype).max) (m4:437)."""
    limit = min(limit, torch.finfo(x.dtype).max)
    return torch.clamp(x, -limit, limit)


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return ops.rms_norm(x, weight, eps, offset=0.0, use_pow=True)


class Norm(nn.Module):
    """Gemma 4 RMSNorm, ``x̂ * w`` (m4:204-222)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return _rms(x, self.weight, self.eps)


class ClippedLinear(nn.Module):
    """clamp(in) -> x @ W.T -> clamp(out), the bounds checkpoint scalars (m4:175-201); plain when unclipped."""

    def __init__(self, n_in: int, n_out: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out, bias=False)
        self.clipped = clipped
        if clipped:
            for name in ("input_min", "input_max", "output_min", "output_max"):
                self.register_buffer(name, torch.tensor(float("inf") if name.endswith("max") else -float("inf")))

    def forward(self, x):
        if self.clipped:
            x = torch.clamp(x, self.input_min, self.input_max)
        y = ops.linear(x, self.linear.weight)
        return torch.clamp(y, self.output_min, self.output_max) if self.clipped else y


class SubsampleLayer(nn.Module):
    """mask -> Conv2d(3x3, /2, pad 1) -> LayerNorm over channels -> ReLU; mask[:, ::2] (m4:362-387)."""

    def __init__(self, c_in: int, c_out: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(c_out, eps=eps, bias=False)

    def forward(self, x, mask):  # x (B, C_in, T, F), mask (B, T) bool or None
        if mask is not None:
            x = x * mask[:, None, :, None]
        x = F.conv2d(x.to(self.conv.weight.dtype), self.conv.weight, None, stride=2, padding=1)
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.norm.weight, None, self.norm.eps)
        x = F.relu(x.permute(0, 3, 1, 2).contiguous())  # (B, C_out, T/2, F/2)
        return x, None if mask is None else mask[:, ::2]


class SubsampleConvProjection(nn.Module):
    def __init__(self, spec: AudioSpec):
        super().__init__()
        c0, c1 = spec.channels
        self.layer0 = SubsampleLayer(1, c0, spec.eps)
        self.layer1 = SubsampleLayer(c0, c1, spec.eps)
        self.input_proj_linear = nn.Linear((c0 // 4) * c1, spec.hidden, bias=False)  # m4:403

    def forward(self, features, mask):  # (B, T, M), (B, T) -> (B, T', H), (B, T')
        x, mask = self.layer0(features.unsqueeze(1), mask)
        x, mask = self.layer1(x, mask)
        b, _, t, _ = x.shape
        x = x.permute(0, 2, 3, 1).contiguous().reshape(b, t, -1)  # (B, T', F/4 * C1), channel innermost
        return ops.linear(x, self.input_proj_linear.weight), mask


class FeedForward(nn.Module):
    """x + w·post_norm(clamp(W2 act(W1 pre_norm(clamp(x))))) (m4:420-452); norms at eps 1e-6."""

    def __init__(self, spec: AudioSpec):
        super().__init__()
        h = spec.hidden
        self.ffw_layer_1 = ClippedLinear(h, 4 * h, spec.clipped)
        self.ffw_layer_2 = ClippedLinear(4 * h, h, spec.clipped)
        self.pre_layer_norm, self.post_layer_norm = Norm(h, 1e-6), Norm(h, 1e-6)  # not config eps (m4:428-429)
        self.act, self.grad_clip, self.weight = _act(spec.act), spec.grad_clip, spec.residual_weight

    def forward(self, x):
        h = self.pre_layer_norm(_clamp(x, self.grad_clip))
        h = self.ffw_layer_2(self.act(self.ffw_layer_1(h)))
        h = self.post_layer_norm(_clamp(h, self.grad_clip))
        return h * self.weight + x


class Attention(nn.Module):
    """Chunked local attention with Transformer-XL relative positions, float32 throughout (m4:256-359)."""

    def __init__(self, spec: AudioSpec):
        super().__init__()
        h, n, d = spec.hidden, spec.heads, spec.head_dim
        self.spec = spec
        self.q_proj, self.k_proj, self.v_proj = (ClippedLinear(h, n * d, spec.clipped) for _ in range(3))
        self.post = ClippedLinear(h, h, spec.clipped)
        self.relative_k_proj = nn.Linear(h, n * d, bias=False)
        self.per_dim_scale = nn.Parameter(torch.zeros(d))
        self.q_scale = d**-0.5 / math.log(2)  # m4:267
        self.k_scale = math.log(1 + math.e) / math.log(2)  # m4:268

    def blocks(self, x):  # (B, T, N, D) -> (B, U, W, N, D), zero-padded (m4:285-291)
        b, t, n, d = x.shape
        w = self.spec.chunk
        u = (t + w - 1) // w
        return F.pad(x, (0, 0, 0, 0, 0, u * w - t)).reshape(b, u, w, n, d).contiguous()

    def contexts(self, x):  # (B, T, N, D) -> (B, U, C, N, D): keys left-1 back to right ahead (m4:293-301)
        s = self.spec
        x = F.pad(x, (0, 0, 0, 0, s.left - 1, s.right + s.chunk - 1))
        return torch.movedim(x.unfold(1, s.context, s.chunk), -1, 2).contiguous()

    def rel_shift(self, x):  # (B, N, U, W, P) -> (B, N, U, W, C) (m4:303-310)
        b, n, u, w, p = x.shape
        c = self.spec.context
        x = F.pad(x, (0, c + 1 - p)).view(b, n, u, w * (c + 1))
        return x[..., : w * c].view(b, n, u, w, c)

    def forward(self, x, pos, hidden_mask):
        """x (B, T, H); pos (1, P, H) in x's dtype; hidden_mask (B, 1, U, W, C) bool, True = masked."""
        b, t, _ = x.shape
        n, d = self.spec.heads, self.spec.head_dim
        up = torch.promote_types(x.dtype, torch.float32)  # fp32 (HF's .float()); float64 in a float64 run
        q = self.q_proj(x).to(up).view(b, t, n, d)
        k = self.k_proj(x).to(up).view(b, t, n, d)
        v = self.v_proj(x).to(up).view(b, t, n, d)
        q = q * self.q_scale * F.softplus(self.per_dim_scale)  # softplus in the parameter dtype
        k = k * self.k_scale
        q, k, v = self.blocks(q), self.contexts(k), self.contexts(v)
        u = q.shape[1]
        rel = ops.linear(pos, self.relative_k_proj.weight).view(-1, n, d).to(q.dtype)  # (P, N, D)

        q = q.permute(0, 3, 1, 2, 4)  # (B, N, U, W, D)
        ac = q @ k.permute(0, 3, 1, 4, 2)  # (B, N, U, W, C)
        bd = q.reshape(b, n, -1, d) @ rel.permute(1, 2, 0)  # (B, N, U*W, P)
        bd = self.rel_shift(bd.reshape(b, n, u, self.spec.chunk, -1))
        cap = torch.tensor(self.spec.logit_cap, dtype=self.per_dim_scale.dtype)  # a buffer in the model dtype
        logits = torch.tanh((ac + bd) / cap) * cap
        logits = logits.masked_fill(hidden_mask, self.spec.invalid_logit)
        probs = F.softmax(logits, dim=-1, dtype=up).to(v.dtype)
        out = probs @ v.permute(0, 3, 1, 2, 4)  # (B, N, U, W, D)
        out = out.permute(0, 2, 3, 1, 4).reshape(b, u * self.spec.chunk, -1)[:, :t].contiguous()
        return self.post(out.to(x.dtype))


class LightConv(nn.Module):
    """x + W_end act(conv_norm(clamp(causal depthwise conv(GLU(W_start pre_norm(x)))))) (m4:489-527)."""

    def __init__(self, spec: AudioSpec):
        super().__init__()
        h = spec.hidden
        self.linear_start = ClippedLinear(h, 2 * h, spec.clipped)
        self.linear_end = ClippedLinear(h, h, spec.clipped)
        self.depthwise_conv1d = nn.Conv1d(h, h, spec.conv_kernel, groups=h, bias=False)
        self.pre_layer_norm, self.conv_norm = Norm(h, spec.eps), Norm(h, spec.eps)  # config eps (m4:504-505)
        self.act, self.grad_clip, self.kernel = _act(spec.act), spec.grad_clip, spec.conv_kernel

    def forward(self, x):  # (B, T, H)
        h = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1)
        h = F.pad(h.transpose(1, 2), (self.kernel - 1, 0))  # causal (m4:470-473)
        h = F.conv1d(h, self.depthwise_conv1d.weight, None, groups=h.shape[1]).transpose(1, 2)  # (B, T, H), a view
        h = self.conv_norm(_clamp(h, self.grad_clip))
        return self.linear_end(self.act(h)) + x


class ConformerLayer(nn.Module):
    def __init__(self, spec: AudioSpec):
        super().__init__()
        h = spec.hidden
        self.feed_forward1, self.feed_forward2 = FeedForward(spec), FeedForward(spec)
        self.self_attn = Attention(spec)
        self.lconv1d = LightConv(spec)
        self.norm_pre_attn, self.norm_post_attn, self.norm_out = Norm(h, 1e-6), Norm(h, 1e-6), Norm(h, 1e-6)  # m4:540-542
        self.grad_clip = spec.grad_clip

    def forward(self, x, pos, hidden_mask):  # (B, T, H) -> (B, T, H) (m4:549-578)
        x = self.feed_forward1(x)
        limit = min(self.grad_clip, torch.finfo(self.norm_pre_attn.weight.dtype).max)  # m4:554
        a = self.self_attn(self.norm_pre_attn(torch.clamp(x, -limit, limit)), pos, hidden_mask)
        x = self.norm_post_attn(torch.clamp(a, -limit, limit)) + x
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(torch.clamp(x, -limit, limit))


class MultimodalEmbedder(nn.Module):
    """``embed_audio``: Linear(RMSNorm without scale) (m4:2123-2147)."""

    def __init__(self, n_in: int, n_out: int, eps: float):
        super().__init__()
        self.embedding_projection = nn.Linear(n_in, n_out, bias=False)
        self.eps = eps

    def forward(self, x):
        return ops.linear(_rms(x, None, self.eps), self.embedding_projection.weight)


def _relative_positions(spec: AudioSpec, dtype: torch.dtype) -> torch.Tensor:
    """(1, P, H) [sin, cos] of offsets C//2 .. 0 (m4:225-253); timescales fp32, then the model dtype."""
    half = spec.hidden // 2
    step = math.log(10000.0 / 1.0) / max(half - 1, 1)
    inv = (1.0 * torch.exp(torch.arange(half) * -step)).to(dtype)[None, None]  # (1, 1, H/2)
    offsets = torch.arange(spec.context // 2, -1, -1)[..., None]  # (P, 1) int64
    scaled = offsets * inv  # (1, P, H/2) in the model dtype
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=-1).to(dtype)


def blocked_mask(spec: AudioSpec, valid: torch.Tensor) -> torch.Tensor:
    """valid (B, T) bool -> (B, 1, U, W, C) bool, True where a logit is masked (m4:1947-1960, m4:1995-2020)."""
    b, t = valid.shape
    w, c = spec.chunk, spec.context
    u = (t + w - 1) // w
    q = (torch.arange(u)[:, None] * w + torch.arange(w)[None, :])[:, :, None]  # (U, W, 1)
    k = torch.arange(u)[:, None, None] * w - (spec.left - 1) + torch.arange(c)[None, None, :]  # (U, 1, C)
    dist = q - k
    window = ((dist >= 0) & (dist < spec.left - 1)) | ((dist < 0) & (-dist < spec.right))
    inside = (q < t) & (k >= 0) & (k < t)
    padded = F.pad(valid, (spec.left - 1, u * w + spec.right - t), value=False)  # key k at index k + left - 1
    allowed = window & inside & padded[:, k + spec.left - 1]  # (B, U, W, C)
    return ~allowed[:, None]


class Gemma4AudioTower(nn.Module):
    """HF ``Gemma4AudioModel`` + ``embed_audio``; see the module docstring."""

    def __init__(self, spec: AudioSpec, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = spec
        self.subsample_conv_projection = SubsampleConvProjection(spec)
        self.layers = nn.ModuleList(ConformerLayer(spec) for _ in range(spec.layers))
        self.output_proj = nn.Linear(spec.hidden, spec.out_dims, bias=True)
        self.embed_audio = MultimodalEmbedder(spec.out_dims, spec.text_hidden, spec.eps)
        self.to(dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.output_proj.weight.dtype

    # -- loading -----------------------------------------------------------------------------------
    @staticmethod
    def expected_shapes(hf_config) -> dict[str, tuple[int, ...]]:
        """HF names (as ``Gemma4ForConditionalGeneration.state_dict()`` gives them) -> shapes."""
        spec = AudioSpec.from_hf(hf_config)
        with torch.device("meta"):
            tower = Gemma4AudioTower(spec)
        return {_hf_name(name): tuple(t.shape) for name, t in _tensors(tower).items()}

    @classmethod
    def from_hf(cls, hf_config, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> Gemma4AudioTower:
        """Strict: a missing, misshaped or unexpected ``model.audio_tower.*`` / ``model.embed_audio.*``
        tensor raises :class:`AudioWeightError` naming it; every other name is ignored."""
        spec = AudioSpec.from_hf(hf_config)
        with torch.device("meta"):
            tower = cls(spec, dtype)
        tower.load_state_dict(_checked(tower, _hf_name, state_dict, dtype), strict=True, assign=True)
        return tower.eval()

    # -- forward -----------------------------------------------------------------------------------
    def context(self, x: torch.Tensor, mask: torch.Tensor | None) -> dict:
        """What every conformer layer reads besides x (B, T', H): position table and blocked mask."""
        valid = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask.to(torch.bool)
        return {"pos": _relative_positions(self.spec, x.dtype), "hidden_mask": blocked_mask(self.spec, valid)}

    @torch.no_grad()
    def embed(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """features (B, T, M) (any float dtype), mask (B, T) bool -> ``audio.embed`` (B, T', H), mask (B, T')."""
        return self.subsample_conv_projection(features, None if mask is None else mask.to(torch.bool))

    @torch.no_grad()
    def layer(self, i: int, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Conformer layer i alone on x (B, T', H); ``mask`` the (B, T') frame validity after subsampling."""
        x = x.to(self.dtype)
        return self.layers[i](x, **self.context(x, mask))

    @torch.no_grad()
    def output(self, x: torch.Tensor) -> torch.Tensor:
        """``output_proj`` alone: last layer's output (B, T', H) -> ``audio.out`` (B, T', O)."""
        return F.linear(x.to(self.dtype), self.output_proj.weight, self.output_proj.bias)

    @torch.no_grad()
    def project_from(self, x: torch.Tensor) -> torch.Tensor:
        """``embed_audio`` alone: ``audio.out`` (B, T', O) -> ``audio.proj`` (B, T', H_text)."""
        return self.embed_audio(x.to(self.dtype))

    @torch.no_grad()
    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None,
                capture: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """features (B, T, M), mask (B, T) -> soft tokens (n_valid, H_text): the valid frames of every clip,
        clip-major, as HF merges them into the text sequence."""
        x, frame_mask = self.embed(features, mask)
        _put(capture, "audio.embed", x)
        ctx = self.context(x, frame_mask)
        for i, layer in enumerate(self.layers):
            x = _put(capture, f"audio.layers.{i}.out", layer(x, **ctx))
        out = _put(capture, "audio.out", self.output(x))
        proj = _put(capture, "audio.proj", self.project_from(out))
        if frame_mask is None:
            return proj.reshape(-1, proj.shape[-1])
        return proj[frame_mask]

    def frame_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Mel-frame mask (B, T) -> tower-frame mask (B, T') (two ``[:, ::2]``, m4:385)."""
        return mask.to(torch.bool)[:, ::2][:, ::2]


_PREFIXES = ("model.audio_tower.", "model.embed_audio.")


def _hf_name(name: str) -> str:
    return "model." + name if name.startswith("embed_audio.") else "model.audio_tower." + name


def _checked(tower: nn.Module, hf_name, state_dict: Mapping[str, torch.Tensor], dtype) -> dict[str, torch.Tensor]:
    """The tower's state dict (its own names, in ``dtype``) from an HF-named one, strictly: a missing,
    misshaped or unexpected ``model.audio_tower.*`` / ``model.embed_audio.*`` tensor raises
    :class:`AudioWeightError` naming it; every other name is ignored."""
    mine = {hf_name(name): (name, tuple(t.shape)) for name, t in _tensors(tower).items()}
    for hf, (_, shape) in mine.items():
        if hf not in state_dict:
            raise AudioWeightError(f"missing tensor {hf!r} (expected shape {shape})")
        if tuple(state_dict[hf].shape) != shape:
            raise AudioWeightError(f"tensor {hf!r} has shape {tuple(state_dict[hf].shape)}, expected {shape}")
    for name in state_dict:
        if name.startswith(_PREFIXES) and name not in mine:
            raise AudioWeightError(f"unexpected tensor {name!r} (shape {tuple(state_dict[name].shape)})")
    return {ref: state_dict[hf].detach().to("cpu", dtype) for hf, (ref, _) in mine.items()}


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name (the state-dict entries)."""
    return dict(module.state_dict(keep_vars=True))


# ---------------------------------------------------------------------------------------------------
# Gemma 3n (``m3n:N`` = ``transformers/models/gemma3n/modeling_gemma3n.py`` line N)
# ---------------------------------------------------------------------------------------------------
#
# Differences from Gemma 4, each mirrored: SSCP blocks pad (freq 1|1, time 0|k-1: reverse-causal) instead
# of a symmetric conv pad, and normalise with a *cumulative* group norm over (time so far, freq, channel)
# in float32 (m3n:543-649, m3n:652-718); no feature mask before the convs (m3n:784-791). The conformer
# runs attention in the model dtype (no float32 upcast of q/k/v, logits or softcap; softmax in float32,
# m3n:442-540), q scaled by a buffer ``D^-0.5 / softplus(0)`` (m3n:346-348) and ``softplus(per_dim_scale)``;
# keys see self + (left-1) past + right future frames (a [W, C] band, m3n:352-364), one past frame more
# than Gemma 4's mask; masked logits get ``finfo(dtype).min`` (m3n:522); the relative table covers
# offsets left-1 .. -right, its sinusoids in float32 then cast (m3n:169-173, m3n:251-262); no clipped
# linears; clamps use a ``gradient_clipping`` buffer (m3n:798, m3n:827); FFN / block norms at eps 1e-6
# (m3n:800-803, m3n:829-832, m3n:900); the lightconv input is zeroed at padding frames (m3n:907-910);
# the output keeps every ``conf_reduction_factor``-th frame and zeroes padding frames (m3n:1501-1507).
# The mask convention is inverted: True = padding (m3n:2103 passes ``~input_features_mask``).
# ``embed_audio`` = post-norm(no scale)(W · soft_norm(x)) (m3n:1866-1919); the merge replaces padding
# frames by the embedding of audio-vocab id 127 (``vocab_size - 1`` of the text vocab minus the offset)
# and pads every clip to ``audio_soft_tokens_per_image`` (188) with it (m3n:2106-2125).

_AUDIO3N_DEFAULTS = {  # Gemma3nAudioConfig defaults (c3n:308-331)
    "vocab_size": 128, "vocab_offset": 262_144 + 128, "input_feat_size": 128, "hidden_size": 1536, "rms_norm_eps": 1e-6,
    "gradient_clipping": 1e10, "conf_attention_chunk_size": 12, "conf_attention_context_left": 13,
    "conf_attention_context_right": 0, "conf_attention_logit_cap": 50.0, "conf_num_attention_heads": 8,
    "conf_num_hidden_layers": 12, "conf_conv_kernel_size": 5, "conf_reduction_factor": 4, "conf_residual_weight": 0.5,
    "sscp_conv_channel_size": [128, 32], "sscp_conv_group_norm_eps": 1e-3,
    "sscp_conv_kernel_size": [[3, 3], [3, 3]], "sscp_conv_stride_size": [[2, 2], [2, 2]],
}


@dataclass(frozen=True)
class Audio3nSpec:
    a: dict  # the audio config with defaults filled
    text_hidden: int
    text_vocab: int
    soft_tokens: int  # audio_soft_tokens_per_image

    @classmethod
    def from_hf(cls, hf_config) -> Audio3nSpec:
        cfg = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        audio, text = cfg.get("audio_config"), cfg.get("text_config") or {}
        if audio is None or "hidden_size" not in text:
            raise ValueError("config needs audio_config and text_config.hidden_size")
        a = {**_AUDIO3N_DEFAULTS, **{k: v for k, v in audio.items() if v is not None}}
        return cls(a, text["hidden_size"], text.get("vocab_size", 262_400), cfg.get("audio_soft_tokens_per_image", 188))

    @property
    def hidden(self) -> int:
        return self.a["hidden_size"]

    @property
    def heads(self) -> int:
        return self.a["conf_num_attention_heads"]

    @property
    def chunk(self) -> int:
        return self.a["conf_attention_chunk_size"]

    @property
    def past(self) -> int:
        return max(0, self.a["conf_attention_context_left"] - 1)

    @property
    def future(self) -> int:
        return self.a["conf_attention_context_right"]

    @property
    def context(self) -> int:
        return self.chunk + self.past + self.future


class CumulativeGroupNorm(nn.Module):
    """Per (clip, time): mean / variance over all (time' <= time, freq, channel), float32 (m3n:543-649)."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(channels)), eps

    def forward(self, x):  # (B, T, F, C)
        xf = x.to(torch.float32)
        ones = torch.ones_like(xf, dtype=torch.float32)
        axes = (2, 3)
        cum_sum = torch.cumsum(torch.sum(xf, dim=axes, keepdim=True), dim=1)
        count = torch.clamp(torch.cumsum(torch.sum(ones, dim=axes, keepdim=True), dim=1), min=1.0)
        mean = cum_sum / count
        cum_sq = torch.cumsum(torch.sum((xf - mean).pow(2), dim=axes, keepdim=True), dim=1)
        y = (xf - mean) * torch.rsqrt(cum_sq / count + self.eps)
        y = y * self.weight.to(torch.float32).view(1, 1, 1, -1)
        return (y * ones).to(x.dtype)


class SSCPBlock(nn.Module):
    """pad (freq 1|1, time 0|k-1) -> Conv2d(stride) -> cumulative group norm -> ReLU (m3n:652-718)."""

    def __init__(self, c_in: int, c_out: int, kernel, stride, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, tuple(kernel), stride=tuple(stride), bias=False)
        self.norm = CumulativeGroupNorm(c_out, eps)
        self.pad, self.stride = (1, 1, 0, kernel[0] - 1), tuple(stride)

    def forward(self, x):  # (B, C_in, T, F) -> (B, C_out, T', F')
        x = F.pad(x, self.pad, mode="constant", value=0.0).to(self.conv.weight.dtype)
        x = F.conv2d(x, self.conv.weight, None, stride=self.stride)
        x = self.norm(x.permute(0, 2, 3, 1).contiguous())
        return F.relu(x.permute(0, 3, 1, 2).contiguous())


class SSCP3n(nn.Module):
    def __init__(self, spec: Audio3nSpec):
        super().__init__()
        a = spec.a
        f = a["input_feat_size"]
        chans, kernels, strides = a["sscp_conv_channel_size"], a["sscp_conv_kernel_size"], a["sscp_conv_stride_size"]
        for i in range(2):
            f = (f + 2 - kernels[i][1]) // strides[i][1] + 1  # m3n:736-770
        self.conv_0 = SSCPBlock(1, chans[0], kernels[0], strides[0], a["sscp_conv_group_norm_eps"])
        self.conv_1 = SSCPBlock(chans[0], chans[1], kernels[1], strides[1], a["sscp_conv_group_norm_eps"])
        self.input_proj_linear = nn.Linear(chans[1] * f, a["hidden_size"], bias=False)

    def forward(self, features):  # (B, T, M) -> (B, T', H)
        x = self.conv_1(self.conv_0(features.unsqueeze(1)))
        b, c, t, f = x.shape
        x = x.permute(0, 2, 3, 1).contiguous().view(b, t, f * c)
        return ops.linear(x, self.input_proj_linear.weight)


class Attention3n(nn.Module):
    """Chunked local attention in the model dtype; returns (B, T, N, D) before ``post`` (m3n:319-540)."""

    def __init__(self, spec: Audio3nSpec):
        super().__init__()
        h, n = spec.hidden, spec.heads
        d = h // n
        self.spec, self.n, self.d = spec, n, d
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(h, n * d, bias=False) for _ in range(3))
        self.per_dim_scale = nn.Parameter(torch.zeros(d))
        self.pos_proj = nn.Linear(h, n * d, bias=False)  # relative_position_embedding.pos_proj
        self.register_buffer("q_scale", d**-0.5 * (1.0 / F.softplus(torch.tensor(0.0))), persistent=False)  # m3n:346-348
        self.register_buffer("inv_timescales", torch.empty(1, 1, h // 2), persistent=False)
        self.register_buffer("softcap", torch.empty(()), persistent=False)
        self.keep_fp32_buffers(spec)

    def keep_fp32_buffers(self, spec: Audio3nSpec) -> None:
        """The relative-position timescales and the softcap as ``from_pretrained(dtype)`` holds them whatever
        the model dtype: fp32, computed in fp32 (m3n:166-171, m3n:348; a ``.to(dtype)`` rounds them)."""
        half = spec.hidden // 2
        step = math.log(1.0e4 / 1.0) / max(half - 1, 1)
        device = self.q_proj.weight.device
        self.inv_timescales = (1.0 * torch.exp(torch.arange(half, device=device) * -step)).float()[None, None]
        self.softcap = torch.tensor(float(spec.a["conf_attention_logit_cap"]), dtype=torch.float32, device=device)
        w, c, s = spec.chunk, spec.context, spec.past + spec.future
        band = torch.tril(torch.ones(c, w, dtype=torch.bool)).T & torch.tril(torch.ones(w, c, dtype=torch.bool), diagonal=s)
        self.register_buffer("band", band, persistent=False)  # (W, C) m3n:352-364

    def _pad_time(self, x, left, right):  # zeros of x's dtype, by concatenation (m3n:366-371)
        b, _, *tail = x.shape
        return torch.cat([x.new_zeros((b, left, *tail)), x, x.new_zeros((b, right, *tail))], dim=1)

    def blocks(self, x):  # (B, T, N, D) -> (B, U, W, N, D)
        b, t = x.shape[:2]
        w = self.spec.chunk
        u = (t + w - 1) // w
        if u * w - t > 0:
            x = self._pad_time(x, 0, u * w - t)
        return x.reshape((b, u, w) + x.shape[2:]).contiguous()

    def contexts(self, x):  # (B, T, ...) -> (B, U, C, ...)
        s = self.spec
        x = self._pad_time(x, s.past, s.future + s.chunk - 1)
        x = x.unfold(dimension=1, size=s.context, step=s.chunk)
        if x.ndim > 3:
            x = torch.movedim(x, -1, 2)
        return x.contiguous()

    def forward(self, x, pad_mask):  # x (B, T, H), pad_mask (B, T) True = padding
        b, t, _ = x.shape
        n, d, s = self.n, self.d, self.spec
        q = ops.linear(x, self.q_proj.weight).reshape(b, t, n, d).contiguous()
        k = ops.linear(x, self.k_proj.weight).reshape(b, t, n, d).contiguous()
        v = ops.linear(x, self.v_proj.weight).reshape(b, t, n, d).contiguous()
        q = q * self.q_scale * F.softplus(self.per_dim_scale).view(1, 1, 1, d)
        qb, kb, vb = self.blocks(q), self.contexts(k), self.contexts(v)
        u, w, c = qb.shape[1], s.chunk, s.context
        allowed = self.contexts(~pad_mask)[:, None, :, None, :] & self.band[None, None, None]  # (B, 1, U, W, C)

        # relative positions past .. -future (m3n:251-316)
        pos = torch.arange(s.past, -s.future - 1, -1)[None].float()[..., None]  # (1, P, 1)
        scaled = pos * self.inv_timescales.to(dtype=torch.float32)
        timing = torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=-1).type(qb.dtype)  # (1, P, H)
        p = timing.shape[1]
        rel = ops.linear(timing, self.pos_proj.weight).reshape(1, p, n, d).squeeze(0)  # (P, N, D)
        qp = qb.permute(0, 3, 1, 2, 4)  # (B, N, U, W, D)
        ac = torch.matmul(qp, kb.permute(0, 3, 1, 4, 2))  # (B, N, U, W, C)
        bd = torch.matmul(qb.permute(0, 3, 1, 2, 4).reshape(b, n, u * w, d), rel.permute(1, 2, 0))
        bd = F.pad(bd.reshape(b, n, u, w, p), (0, c + 1 - p)).reshape(b, n, u, w * (c + 1))
        bd = bd[:, :, :, : w * c].reshape(b, n, u, w, c)
        logits = ac + bd
        cap = self.softcap
        logits = torch.tanh(logits / cap) * cap
        logits = torch.where(allowed, logits, torch.finfo(logits.dtype).min)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32).to(dtype=vb.dtype)
        out = torch.bmm(probs.permute(0, 2, 1, 3, 4).reshape(-1, w, c), vb.permute(0, 1, 3, 2, 4).reshape(-1, c, d))
        out = out.reshape(b, u, n, w, d).permute(0, 1, 3, 2, 4).reshape(b, u * w, n, d)
        return out[:, :t]


class FeedForward3n(nn.Module):
    def __init__(self, spec: Audio3nSpec):
        super().__init__()
        h = spec.hidden
        self.pre_layer_norm, self.post_layer_norm = Norm(h, 1e-6), Norm(h, 1e-6)  # m3n:829-832
        self.ffw_layer_1, self.ffw_layer_2 = nn.Linear(h, 4 * h, bias=False), nn.Linear(4 * h, h, bias=False)
        self.register_buffer("gradient_clipping", torch.tensor(float(spec.a["gradient_clipping"])), persistent=False)
        self.scale = spec.a["conf_residual_weight"]

    def forward(self, x):  # m3n:835-844
        gc = self.gradient_clipping
        h = self.pre_layer_norm(torch.clamp(x, -gc, gc))
        h = ops.linear(F.silu(ops.linear(h, self.ffw_layer_1.weight)), self.ffw_layer_2.weight)
        return x + self.post_layer_norm(torch.clamp(h, -gc, gc)) * self.scale


class ConformerBlock3n(nn.Module):
    """ffw_start -> attention (+res) -> zero padding -> lightconv -> ffw_end -> clamp -> norm (m3n:890-914)."""

    def __init__(self, spec: Audio3nSpec):
        super().__init__()
        h, eps = spec.hidden, spec.a["rms_norm_eps"]
        self.ffw_layer_start, self.ffw_layer_end = FeedForward3n(spec), FeedForward3n(spec)
        self.attention = nn.Module()
        self.attention.pre_attn_norm, self.attention.post_norm = Norm(h, 1e-6), Norm(h, 1e-6)  # m3n:800-803
        self.attention.attn = Attention3n(spec)
        self.attention.post = nn.Linear(h, h, bias=False)
        self.lconv1d = nn.Module()
        self.lconv1d.pre_layer_norm, self.lconv1d.conv_norm = Norm(h, eps), Norm(h, eps)  # m3n:851, m3n:864
        self.lconv1d.linear_start = nn.Linear(h, 2 * h, bias=False)
        self.lconv1d.depthwise_conv1d = nn.Conv1d(h, h, spec.a["conf_conv_kernel_size"], groups=h, bias=False)
        self.lconv1d.linear_end = nn.Linear(h, h, bias=False)
        self.norm = Norm(h, 1e-6)  # m3n:900
        self.register_buffer("gradient_clipping", torch.tensor(float(spec.a["gradient_clipping"])), persistent=False)
        self.kernel = spec.a["conf_conv_kernel_size"]

    def forward(self, x, pad_mask):  # (B, T, H), (B, T) True = padding
        gc, att, lc = self.gradient_clipping, self.attention, self.lconv1d
        x = self.ffw_layer_start(x)
        a = att.attn(att.pre_attn_norm(torch.clamp(x, -gc, gc)), pad_mask)  # m3n:806-820
        a = torch.clamp(ops.linear(a.reshape(*a.shape[:2], -1), att.post.weight), -gc, gc)
        x = x + att.post_norm(a)
        x = x * (~pad_mask).unsqueeze(-1).to(x.dtype)
        h = F.glu(ops.linear(lc.pre_layer_norm(x), lc.linear_start.weight), dim=-1)  # m3n:869-888
        h = F.conv1d(F.pad(h.permute(0, 2, 1), (self.kernel - 1, 0)), lc.depthwise_conv1d.weight, None, groups=h.shape[-1])
        h = lc.conv_norm(torch.clamp(h.permute(0, 2, 1), -gc, gc))
        x = ops.linear(F.silu(h), lc.linear_end.weight) + x
        x = self.ffw_layer_end(x)
        return self.norm(torch.clamp(x, -gc, gc))


class Embedder3n(nn.Module):
    """Gemma 3n's ``embed_audio`` / ``embed_vision``: soft: post_norm(W soft_norm(x)); hard: post_norm(W
    hard_norm(E[id - offset])); the post norm has no gain (m3n:1866-1913)."""

    def __init__(self, vocab: int, width: int, text_hidden: int, eps: float, offset: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.hard_embedding_norm, self.soft_embedding_norm = Norm(width, eps), Norm(width, eps)
        self.embedding_projection = nn.Linear(width, text_hidden, bias=False)
        self.eps, self.offset = eps, offset

    def forward(self, x=None, ids=None):
        normed = self.soft_embedding_norm(x) if ids is None else self.hard_embedding_norm(self.embedding(ids - self.offset))
        return _rms(ops.linear(normed, self.embedding_projection.weight), None, self.eps)


class Gemma3nAudioTower(nn.Module):
    """HF ``Gemma3nAudioEncoder`` + ``embed_audio`` + the merge's padding (m3n:1433-1511, m3n:2102-2121).
    Same probes as :class:`Gemma4AudioTower`; ``mask`` is the feature extractor's (True = real frame)."""

    def __init__(self, spec: Audio3nSpec, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = spec
        self.subsample_conv_projection = SSCP3n(spec)
        self.conformer = nn.ModuleList(ConformerBlock3n(spec) for _ in range(spec.a["conf_num_hidden_layers"]))
        a = spec.a
        self.embed_audio = Embedder3n(a["vocab_size"], spec.hidden, spec.text_hidden, a["rms_norm_eps"], a["vocab_offset"])
        self.to(dtype)  # q_scale and the clip bounds in the model dtype, as from_pretrained(dtype) holds them
        self.keep_fp32_buffers()

    def keep_fp32_buffers(self) -> None:
        """After any ``.to(dtype)``: the buffers from_pretrained holds in fp32 (see ``Attention3n``)."""
        for block in self.conformer:
            block.attention.attn.keep_fp32_buffers(self.spec)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_audio.embedding_projection.weight.dtype

    @staticmethod
    def expected_shapes(hf_config) -> dict[str, tuple[int, ...]]:
        spec = Audio3nSpec.from_hf(hf_config)
        with torch.device("meta"):
            tower = Gemma3nAudioTower(spec)
        return {_hf_name_3n(k): tuple(t.shape) for k, t in _tensors(tower).items()}

    @classmethod
    def from_hf(cls, hf_config, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> Gemma3nAudioTower:
        tower = cls(Audio3nSpec.from_hf(hf_config), dtype)  # not on meta: its fixed buffers are built here
        tower.load_state_dict(_checked(tower, _hf_name_3n, state_dict, dtype), strict=True)
        return tower.eval()

    @torch.no_grad()
    def embed(self, features, mask=None):
        """features (B, T, M), mask (B, T) True = real -> ``audio.embed`` (B, T', H), padding mask (B, T')."""
        x = self.subsample_conv_projection(features)
        if mask is None:
            return x, torch.zeros(x.shape[:2], dtype=torch.bool)
        return x, self.subsampled_padding(mask, x.shape[1])

    def subsampled_padding(self, mask: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        """Feature mask (B, T) True = real -> padding mask (B, T') of the subsampled frames (HF reads the mask at
        every ``stride``-th frame, m3n:1483-1491). Each SSCP convolution pads time by k - 1 on the right, so
        T' = ceil(T / stride) per convolution."""
        strides = [s[0] for s in self.spec.a["sscp_conv_stride_size"]]
        if frames is None:
            frames = mask.shape[1]
            for s in strides:
                frames = -(-frames // s)
        pad = ~mask.to(torch.bool)
        idx = torch.clamp(torch.arange(frames) * math.prod(strides), max=pad.shape[1] - 1)
        return torch.gather(pad, 1, idx[None].expand(pad.shape[0], -1))

    def output_padding(self, mask: torch.Tensor) -> torch.Tensor:
        """Feature mask (B, T) True = real -> padding mask (B, T'') of ``audio.out`` / ``audio.proj``."""
        return self.subsampled_padding(mask)[:, :: self.spec.a["conf_reduction_factor"]]

    @torch.no_grad()
    def layer(self, i: int, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Conformer block i alone; ``pad_mask`` (B, T') True = padding (as :meth:`embed` returns it)."""
        pad = torch.zeros(x.shape[:2], dtype=torch.bool) if pad_mask is None else pad_mask.to(torch.bool)
        return self.conformer[i](x.to(self.dtype), pad)

    @torch.no_grad()
    def output(self, x: torch.Tensor, pad_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last block's output -> ``audio.out`` (every r-th frame, padding zeroed) and its padding mask."""
        r = self.spec.a["conf_reduction_factor"]
        if r > 1:
            x, pad_mask = x[:, ::r], pad_mask[:, ::r]
        return x.masked_fill(pad_mask.unsqueeze(-1), 0.0), pad_mask

    @torch.no_grad()
    def project_from(self, x: torch.Tensor) -> torch.Tensor:
        """``embed_audio`` (soft path) alone: ``audio.out`` -> ``audio.proj``."""
        return self.embed_audio(x.to(self.dtype))

    @torch.no_grad()
    def merged(self, proj: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """(B, T'', H_text) -> (B, soft_tokens, H_text): padding frames and the tail replaced by the embedding
        of the last audio-vocab id (m3n:2112-2120)."""
        pad_emb = self.embed_audio(ids=torch.tensor([[self.spec.text_vocab - 1]]))
        feats = torch.where(pad_mask.unsqueeze(-1), pad_emb, proj)
        b, t, h = feats.shape
        return torch.cat((feats, pad_emb.expand(b, self.spec.soft_tokens - t, h)), dim=1)

    @torch.no_grad()
    def forward(self, features, mask=None, capture=None) -> torch.Tensor:
        """features (B, T, M), mask (B, T) True = real -> merged soft tokens (B * soft_tokens, H_text)."""
        x, pad = self.embed(features, mask)
        _put(capture, "audio.embed", x)
        for i, block in enumerate(self.conformer):
            x = _put(capture, f"audio.layers.{i}.out", block(x, pad))
        out, pad = self.output(x, pad)
        _put(capture, "audio.out", out)
        proj = _put(capture, "audio.proj", self.project_from(out))
        return self.merged(proj, pad).reshape(-1, proj.shape[-1])


_3N_NAMES = (("attention.attn.pos_proj.", "attention.attn.relative_position_embedding.pos_proj."),)


def _hf_name_3n(name: str) -> str:
    for ours, theirs in _3N_NAMES:
        name = name.replace(ours, theirs)
    return "model." + name if name.startswith("embed_audio.") else "model.audio_tower." + name
