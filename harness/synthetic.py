"""Random weights and inputs that make conformance bugs visible on tiny models.

HF's default init (std 0.02) hides softcap, RoPE and norm bugs: logits stay near 0, attention is
nearly uniform, and a norm weight left at 0 makes (1 + w) look like w's absence. Instead:

* every tensor the checkpoint carries is random, norm weights included (N(0, 0.3) offsets);
* linear layers N(0, 1/fan_in), with q and k ×3 so attention logits reach the ±50 softcap;
* the (tied) embedding is scaled so the logits have std ≈ 13 and several % exceed the ±30 cap;
* sequences are ≥ 3× the largest sliding window, and the second row is left-padded.

Gemma 4 norms scale by ``w`` itself, so its norm gains are drawn around 1 (N(1, 0.25)); its q/k
norm gains N(1, 0.15)·D^-¼ (attention scale is 1.0: unit gains make attention near-argmax and the
tiny model chaotic); ``layer_scalar`` U(0.5, 0.9), ``per_expert_scale`` U(0.5, 1.5), router ``scale``
N(1, 0.25) — none left at its initial 1, where a port that drops it would pass.

That is :data:`BITE`, used for float32 runs. bfloat16 runs use :data:`TRAINED`: the same draws with
q/k at unit gain, the norms on sublayer outputs at half gain, Gemma 4's layer scalars in U(0.8, 0.95)
and a sharper router, so the random model is as tame as a trained one and two correct bf16
implementations stay close (calibrated in :mod:`harness.calibrate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from reference_impl.spec import Gemma3nMediaSpec, Gemma4MediaSpec, ModelSpec, MultimodalSpec
from reference_impl.weights import embedding_name, expected_shapes

MIN_LENGTH = 40
LEFT_PAD = 5


@dataclass(frozen=True)
class Conditioning:
    """How the random weights are drawn. ``BITE`` (float32 runs) makes bugs loud; ``TRAINED`` (bfloat16
    runs) keeps the model as tame as a trained one, so bf16 rounding is not amplified layer after
    layer into noise that hides bugs (see :mod:`harness.tolerance`)."""

    name: str
    purpose: str
    norm_std: float  # Gemma 1-3 norm weights: offsets from the implicit 1 (scale is 1 + w)
    gain_std: float  # Gemma 4 norm gains, drawn around 1 (scale is w)
    post_norm_gain: float  # scale of the norms on a sublayer's output before its residual add
    qk_gain: float  # q and k projections, relative to unit gain (Gemma 1-3)
    qk_norm_std: float  # Gemma 4 q/k norm gains: (1 + std * N(0, 1)) * head_dim^-1/4
    logit_std: float  # the (tied) embedding is scaled so the logits have about this std
    layer_scalar: tuple[float, float]  # Gemma 4 layer_scalar ~ U(low, high)
    router_gain: float = 1.0  # Gemma 4 router projection, relative to unit gain (higher: more decisive routing)


BITE = Conditioning("bite", "large gains: bugs loud", norm_std=0.3, gain_std=0.25, post_norm_gain=1.0, qk_gain=3.0, qk_norm_std=0.15,
                    logit_std=13.0, layer_scalar=(0.5, 0.9))
# For bf16 runs. Post-norm gains halved and layer scalars nearer 1: each layer's update stays small next
# to the stream, as in a trained model, instead of a chaotic random one where bf16 rounding grows ~1.5x
# per layer (Gemma 4 twins, BITE: logits KL 0.61 between two correct bf16 implementations; TRAINED:
# 5.2e-3, the Gemma 1-3 level of 3.2e-3). q/k at unit gain: attention scores near the softcap (BITE's x3) make bf16
# attention outputs noisy (Gemma 1/2 isolated attention rel_rms 0.021 -> 0.0075). A router 8x sharper:
# decisive expert choices, so a wrong one is not a near-tie. The logit scale stays as in BITE, so the
# final softcap still bites. Figures: reports/calibration.md.
TRAINED = replace(BITE, name="trained", purpose="tame as a trained model: bf16 rounding not amplified",
                  qk_gain=1.0, post_norm_gain=0.5, layer_scalar=(0.8, 0.95), router_gain=8.0)
_POST_NORMS = ("post_feedforward_layernorm.weight", "post_feedforward_layernorm_1.weight",
               "post_feedforward_layernorm_2.weight", "post_per_layer_input_norm.weight")


def conditioning_for(dtype: str) -> Conditioning:
    """float32 runs get the weights that bite; bfloat16 runs the trained-like ones."""
    return TRAINED if dtype == "bfloat16" else BITE


def _is_post_norm(spec: ModelSpec, name: str) -> bool:
    """Norms applied to a sublayer's output before the residual add (HF's post_attention_layernorm is the
    pre-MLP norm in Gemma 1, a post norm from Gemma 2 on)."""
    return name.endswith(_POST_NORMS) or (spec.family != "gemma" and name.endswith("post_attention_layernorm.weight"))


def random_state_dict(spec: ModelSpec, seed: int = 0, conditioning: Conditioning = BITE) -> dict[str, torch.Tensor]:
    """fp32 tensors under HF names for every tensor the checkpoint carries."""
    c = conditioning
    if spec.gemma3n is not None: return random_state_dict_gemma3n(spec, seed, conditioning)  # noqa: E701
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(spec).items():
        w = torch.randn(shape, generator=gen)
        if name.startswith(_TOWERS):
            state[name] = _tower_tensor(name, w, c)
            continue
        if spec.norm_offset == 0 and (len(shape) == 1 or name.endswith("layer_scalar")):
            w = _gemma4_gain(name, w, shape, gen, c)
            state[name] = w * c.post_norm_gain if c.post_norm_gain != 1 and _is_post_norm(spec, name) else w
            continue
        if len(shape) == 1:
            w *= c.norm_std
            if c.post_norm_gain != 1 and _is_post_norm(spec, name):  # (1 + w) scaled by the gain
                w = c.post_norm_gain * (1 + w) - 1
        elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            w /= math.sqrt(shape[2])
        elif name in (embedding_name(spec), "lm_head.weight"):
            w *= c.logit_std / math.sqrt(spec.hidden_size)
        else:
            w /= math.sqrt(shape[1])
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                w *= c.qk_gain
            elif name.endswith("router.proj.weight"):
                w *= c.router_gain
        state[name] = w
    return state


_TOWERS = ("model.vision_tower.", "model.multi_modal_projector.", "model.embed_vision.", "model.audio_tower.",
           "model.embed_audio.")
_CLIP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")


def _tower_tensor(name: str, w: torch.Tensor, c: Conditioning) -> torch.Tensor:
    """A vision tower or projector tensor: no value HF's init gives (zero projector, zero biases, unit
    LayerNorms) that would hide a bug. LayerNorm gains ~ 1 + N(0, norm_std), biases N(0, 0.2), the
    position table N(0, 0.5) (patch embeddings have std ~0.6), matrices at unit gain over their fan-in
    (the projector is (C, H_text), used as x @ W: its fan-in is its first dim), q/k at ``qk_gain``."""
    if name.endswith("mm_soft_emb_norm.weight"):  # Gemma RMSNorm: 1 + w
        return w * c.norm_std
    if name.endswith(_CLIP_BOUNDS):  # Gemma 4 clipped linears: finite bounds that clip (HF's init: +-inf)
        low = 0.4 if ("down_proj.input" in name or "o_proj.input" in name) else 1.0
        bound = low * (1 + torch.sigmoid(w))  # w: a seeded N(0, 1) draw, so the bound lies in (low, 2 low)
        return -bound if name.endswith("min") else bound
    if name.endswith("position_embedding_table"):  # Gemma 4: (2, positions, C), x and y tables
        return w * 0.35
    if name.endswith(("q_norm.weight", "k_norm.weight")):  # Gemma 4 tower: scale 1.0, the gains set the temperature
        return (1 + 0.15 * w) * w.shape[0] ** -0.25
    if name.endswith("std_scale"):
        return 1 + 0.1 * w
    if name.endswith(("std_bias", "per_dim_scale")):
        return w * 0.5
    if name.endswith("mm_input_projection_weight"):
        return w / math.sqrt(w.shape[0])
    if name.endswith("position_embedding.weight"):
        return w * 0.5
    if name.endswith(".bias"):
        return w * 0.2
    if w.dim() == 1:  # LayerNorm weight
        return 1 + w * c.norm_std
    w = w / math.sqrt(w[0].numel())  # (out, in) or a convolution (C, 3, p, p)
    return w * c.qk_gain if name.endswith(("q_proj.weight", "k_proj.weight")) else w


def _gemma4_gain(name: str, w: torch.Tensor, shape, gen, c: Conditioning) -> torch.Tensor:
    """Gains of a norm that multiplies by w (Gemma 4), and the other per-channel scales."""
    if name.endswith("layer_scalar"):
        low, high = c.layer_scalar
        return low + (high - low) * torch.rand(shape, generator=gen)  # never exactly 1
    if name.endswith("per_expert_scale"):
        return 0.5 + torch.rand(shape, generator=gen)
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return (1 + c.qk_norm_std * w) * shape[0] ** -0.25
    return 1 + c.gain_std * w


# Gemma 3n (x * w norms, as Gemma 4): post norms are the norms on a branch's output before it is added
_3N_POST_NORMS = ("post_attention_layernorm.weight", "post_laurel_norm.weight", *_POST_NORMS)


def random_state_dict_gemma3n(spec: ModelSpec, seed: int = 0, conditioning: Conditioning = BITE) -> dict[str, torch.Tensor]:
    """fp32 tensors under HF ``Gemma3nForCausalLM`` names, none at HF's init (zeros and ones hide bugs).

    As Gemma 4 (its norms scale by w): norm gains N(1, gain_std), q/k norm gains (1 + qk_norm_std N)·D^-¼,
    the post norms (attention, LAuReL, MLP, PLE) at ``post_norm_gain``, matrices N(0, 1/fan_in), the tied
    embedding at the logit scale. Gemma 3n's own tensors:

    * AltUp ``modality_router`` N(0, 1)·sqrt(H) (TRAINED: half that): its input is normed and then times 1/H,
      so the routed values have std ~1 (~0.5) and the tanh bends (std 1/sqrt(H) weights give ~0.02: the
      router, and a port that drops its 1/H, would hardly matter);
    * ``prediction_coefs`` / ``correction_coefs`` N(0, 0.05) (TRAINED: 0.02). The mixing is what makes the
      random 3n chaotic: with N(0, 0.15), correct pairs (reference vs float64, vs HF SDPA; seeds 0-2) drift
      to logits max_rel 8e-5 in float32 (limit 1e-4) and kl_max 16 in bfloat16 (limit 0.02); at these
      values 1.4e-5 and 7.7e-3 (with no mixing at all, bf16 kl_max is still 6.3e-3);
    * ``correct_output_scale`` U(0.5, 1.5) per channel (0 at HF's init; never 1, where dropping it passes);
    * the per-layer table N(0, 1/P) (times sqrt(P) in the model: unit rows), its projections N(0, 1/fan_in);
    * LAuReL's left/right N(0, 1/fan_in), its post-norm a post norm.
    """
    c = conditioning
    gen = torch.Generator().manual_seed(seed)
    h, p = spec.hidden_size, spec.ple.dim
    trained = c.name == TRAINED.name
    coef_std, router_gain = (0.02, 0.5) if trained else (0.05, 1.0)
    state = {}
    for name, shape in expected_shapes(spec).items():
        w = torch.randn(shape, generator=gen)
        if name.startswith(_TOWERS):  # an image-audio-text model's towers and embedders
            state[name] = _tower_tensor(name, w, c)
            continue
        if name.endswith("correct_output_scale"):
            w = 0.5 + torch.rand(shape, generator=gen)
        elif len(shape) == 1:
            w = _gemma4_gain(name, w, shape, gen, c)
            w = w * c.post_norm_gain if name.endswith(_3N_POST_NORMS) else w
        elif name in (embedding_name(spec), "lm_head.weight"):
            w = w * c.logit_std / math.sqrt(h)
        elif name.endswith("modality_router.weight"):
            w = w * math.sqrt(h) * router_gain
        elif name.endswith(("prediction_coefs.weight", "correction_coefs.weight")):
            w = w * coef_std
        elif name.endswith("embed_tokens_per_layer.weight"):
            w = w / math.sqrt(p)
        else:  # q/k too: their norms follow, the attention's sharpness is in the norm gains
            w = w / math.sqrt(shape[1])
        state[name] = w
    return state


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T) 1 = token, 0 = padding
    position_ids: torch.Tensor | None  # (B, T); None: the implementation counts positions from 0 itself
    # image-text models: the images of the placeholder runs in (row, position) order, (I, 3, S, S), and
    # the row each one is in, (I,)
    pixel_values: torch.Tensor | None = None
    image_rows: torch.Tensor | None = None
    # Gemma 4: each image's patch positions (I, P, 2), (-1, -1) on padding; audio clips' log-mel features
    # (A, T, M), their frame mask (A, T) and the row each clip is in (A,)
    image_position_ids: torch.Tensor | None = None
    audio_features: torch.Tensor | None = None
    audio_mask: torch.Tensor | None = None
    audio_rows: torch.Tensor | None = None

    @property
    def media(self) -> dict[str, torch.Tensor]:
        """The batch's media inputs, as the reference takes them (none for a text batch)."""
        names = ("pixel_values", "image_position_ids", "audio_features", "audio_mask")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def _images_of(self, row: int) -> dict:
        out = {}  # a row without images (or clips) gets none: a text row
        if self.pixel_values is not None and bool((keep := self.image_rows == row).any()):
            out |= {"pixel_values": self.pixel_values[keep], "image_rows": torch.zeros(int(keep.sum()), dtype=torch.long)}
            if self.image_position_ids is not None:
                out["image_position_ids"] = self.image_position_ids[keep]
        if self.audio_features is not None and bool((keep := self.audio_rows == row).any()):
            out |= {"audio_features": self.audio_features[keep], "audio_mask": self.audio_mask[keep],
                    "audio_rows": torch.zeros(int(keep.sum()), dtype=torch.long)}
        return out

    @property
    def valid(self) -> torch.Tensor:
        return self.attention_mask.bool()

    @property
    def padded(self) -> bool:
        return bool((self.attention_mask == 0).any())

    def prompts(self) -> list[list[int]]:
        """Each row's real tokens (left padding dropped)."""
        return [row[mask.bool()].tolist() for row, mask in zip(self.input_ids, self.attention_mask, strict=True)]

    def rows(self, positions: bool = True) -> list[Batch]:
        """Each row alone, its padding dropped: (1, real tokens) batches at positions 0..n-1 (given
        explicitly, or left to the implementation with ``positions=False``)."""
        out = []
        for row, prompt in enumerate(self.prompts()):
            ids = torch.tensor([prompt], dtype=self.input_ids.dtype)
            out.append(Batch(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None] if positions else None,
                             **self._images_of(row)))
        return out

    def without_positions(self) -> Batch:
        return replace(self, position_ids=None)

    def describe(self) -> str:
        b, t = self.input_ids.shape
        pads = (self.attention_mask == 0).sum(dim=1).tolist()
        images = ""
        if self.pixel_values is not None:
            per_row = torch.bincount(self.image_rows, minlength=b).tolist()
            images = f", images per row {per_row} ({'x'.join(map(str, self.pixel_values.shape[1:]))})"
        if self.audio_features is not None:
            per_row = torch.bincount(self.audio_rows, minlength=b).tolist()
            frames = self.audio_mask.sum(1).tolist()
            images += f", audio clips per row {per_row} ({frames} mel frames)"
        return f"batch {b} x {t} tokens, left padding per row {pads}{images}"


def default_length(spec: ModelSpec) -> int:
    window = spec.max_window or 0
    length = max(MIN_LENGTH, 3 * window)
    if isinstance(spec.multimodal, MultimodalSpec):  # Gemma 3: room for two images and text around them
        length = max(length, 2 * (spec.multimodal.tokens_per_image + 2) + 14)
    return length


def make_image(size: int, gen: torch.Generator, width: int | None = None) -> torch.Tensor:
    """(3, size, width or size) in [-1, 1] (Gemma 3's processor range): a colour gradient, a bright square,
    noise — structure the pooling and the position tables must keep in place."""
    h, w = size, width or size
    across, down = torch.linspace(-1, 1, w)[None, :].expand(h, w), torch.linspace(-1, 1, h)[:, None].expand(h, w)
    image = torch.stack([across, down, across * down])
    y0, x0 = int(torch.randint(0, h // 2, (1,), generator=gen)), int(torch.randint(0, w // 2, (1,), generator=gen))
    image[:, y0:y0 + h // 4, x0:x0 + w // 4] = 0.9
    return (image + 0.2 * torch.randn(image.shape, generator=gen)).clamp(-1, 1)


def make_waveform(samples: int, gen: torch.Generator, rate: int = 16000) -> torch.Tensor:
    """(samples,) float32: two tones, a chirp and noise, at most 0.9 in magnitude."""
    t = torch.arange(samples) / rate
    f0, f1 = (200 + 600 * torch.rand(2, generator=gen)).tolist()
    wave = 0.4 * torch.sin(2 * torch.pi * f0 * t) + 0.3 * torch.sin(2 * torch.pi * (f1 + 2000 * t) * t)
    return (wave + 0.05 * torch.randn(samples, generator=gen)).clamp(-0.9, 0.9)


# Gemma 4 batches: images of these (height, width) in [0, 1] at the smallest soft-token budget, one
# landscape and one square in row 0, one portrait in row 1 (aspect ratios that move the budget's
# resize), and on audio models one clip per row (lengths in samples, not multiples of the hop)
GEMMA4_IMAGES = ((40, 100, 0), (48, 48, 0), (60, 28, 1))
GEMMA4_BUDGET = 70
GEMMA4_CLIPS = ((7000, 0), (5210, 1))


def _gemma4_media(spec: ModelSpec, gen) -> dict:
    """The images and clips of a Gemma 4 batch, processed as HF's processor does, with their soft-token
    counts and rows."""
    from reference_impl import audio, gemma4_vision

    mm = spec.multimodal
    images = [(make_image(h, gen, w) + 1) / 2 for h, w, _ in GEMMA4_IMAGES]
    pixels, positions, counts = gemma4_vision.images_to_batch(images, GEMMA4_BUDGET, mm.vision_config)
    media = {"pixel_values": pixels, "image_position_ids": positions,
             "image_rows": torch.tensor([row for _, _, row in GEMMA4_IMAGES]), "image_counts": counts}
    if mm.audio_config is not None:
        clips = [audio.log_mel_features(make_waveform(n, gen).numpy()) for n, _ in GEMMA4_CLIPS]
        features, frame_mask = audio.batch_features(clips)
        media |= {"audio_features": features, "audio_mask": frame_mask,
                  "audio_rows": torch.tensor([row for _, row in GEMMA4_CLIPS]),
                  "audio_counts": [audio.soft_token_count(n) for n, _ in GEMMA4_CLIPS]}
    return media


# Gemma 3n batches: square images (the processor's 768 px on the released tower; scaled with the tiny twin's
# output grid, which keeps the fusion's pooling factor of 3) and clips (lengths in samples), each one per row
GEMMA3N_IMAGE_ROWS = (0, 1)
GEMMA3N_CLIPS = ((7000, 0), (5210, 1))


def gemma3n_image_size(spec: ModelSpec) -> int:
    """The side of a Gemma 3n image: 768 px for 16 x 16 tokens (HF's processor), in proportion otherwise."""
    return 48 * math.isqrt(spec.multimodal.vision_tokens)


def _gemma3n_media(spec: ModelSpec, gen) -> dict:
    """The images and clips of a Gemma 3n batch with their placeholder counts and rows. The clips' features
    are HF ``Gemma3nAudioFeatureExtractor``'s for the batch of clips (``audio.batch_features_3n``: every clip
    framed from the waveforms padded to the longest, so both clips get the same number of mel frames)."""
    from reference_impl import audio

    mm, side = spec.multimodal, gemma3n_image_size(spec)
    pixels = torch.stack([(make_image(side, gen) + 1) / 2 for _ in GEMMA3N_IMAGE_ROWS])
    features, frame_mask = audio.batch_features_3n([make_waveform(n, gen).numpy() for n, _ in GEMMA3N_CLIPS])
    return {"pixel_values": pixels, "image_rows": torch.tensor(GEMMA3N_IMAGE_ROWS),
            "image_counts": [mm.vision_tokens] * len(GEMMA3N_IMAGE_ROWS), "audio_features": features,
            "audio_mask": frame_mask, "audio_rows": torch.tensor([row for _, row in GEMMA3N_CLIPS]),
            "audio_counts": [mm.audio_tokens] * len(GEMMA3N_CLIPS)}


def _media_layout(media: dict) -> list[list[tuple[str, int]]]:
    """Per row, the runs after BOS: ("text", n) or ("image" / "audio", soft tokens)."""
    rows: list[list[tuple[str, int]]] = [[("text", 3)], [("text", 4)]]
    for row, n in zip(media["image_rows"].tolist(), media["image_counts"], strict=True):
        rows[row] += [("image", n), ("text", 4)]
    for row, n in zip(media.get("audio_rows", torch.zeros(0)).tolist(), media.get("audio_counts", []), strict=True):
        rows[row] += [("audio", n), ("text", 3)]
    return rows


def _media_batch(spec: ModelSpec, media: dict, gen, left_pad: int) -> Batch:
    """A Gemma 4 / Gemma 3n batch: each image and clip as begin + placeholders + end in its row, random text
    (ids below every media and begin token) around them, row 1 left-padded."""
    mm = spec.multimodal
    layout = _media_layout(media)
    needs = [1 + sum(n + (2 if kind != "text" else 0) for kind, n in runs) for runs in layout]
    length = max(default_length(spec), needs[0] + 2, needs[1] + left_pad + 2)
    ids = torch.randint(0, min(mm.placeholder_ids + (mm.boi_token_id, mm.boa_token_id)), (2, length), generator=gen)
    mask = torch.ones(2, length, dtype=torch.long)
    ids[1, :left_pad], mask[1, :left_pad] = spec.pad_token_id or 0, 0
    wrap = {"image": (mm.boi_token_id, mm.image_token_id, mm.eoi_token_id),
            "audio": (mm.boa_token_id, mm.audio_token_id, mm.eoa_token_id)}
    for row, runs in enumerate(layout):
        at = left_pad if row else 0
        ids[row, at] = spec.bos_token_id if spec.bos_token_id is not None else 2
        at += 1
        for kind, n in runs:
            if kind != "text":
                begin, token, end = wrap[kind]
                ids[row, at], ids[row, at + 1:at + 1 + n], ids[row, at + 1 + n] = begin, token, end
                n += 2
            at += n
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    keep = {k: v for k, v in media.items() if not k.endswith("_counts")}
    return Batch(ids, mask, positions, **keep)


def _place_images(spec: ModelSpec, ids: torch.Tensor, mask: torch.Tensor, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0 gets two images (after a short text, and a few tokens later), row 1 one image, each as
    ``<boi>`` + N placeholders + ``<eoi>``; returns (pixel values (I, 3, S, S), row of each image)."""
    mm = spec.multimodal
    n = mm.tokens_per_image
    ids[ids == mm.image_token_id] = mm.image_token_id - 1 if mm.image_token_id > 3 else mm.image_token_id + 1
    starts = {0: [4, 4 + n + 2 + 4], 1: [int((mask[1] == 0).sum()) + 6]}
    rows = []
    for row, offsets in starts.items():
        for start in offsets:
            ids[row, start] = mm.boi_token_id
            ids[row, start + 1:start + 1 + n] = mm.image_token_id
            ids[row, start + 1 + n] = mm.eoi_token_id
            rows.append(row)
    pixels = torch.stack([make_image(mm.vision.image_size, gen) for _ in rows])
    return pixels, torch.tensor(rows)


def make_batch(spec: ModelSpec, seed: int = 0, length: int | None = None, left_pad: int = LEFT_PAD) -> Batch:
    """Row 0: BOS + random ids over the whole vocabulary. Row 1: `left_pad` pad tokens, then the same.
    Image-text models: images (and audio clips) placed in both rows, see :func:`_place_images` and
    :data:`GEMMA4_IMAGES`."""
    if isinstance(spec.multimodal, (Gemma4MediaSpec, Gemma3nMediaSpec)):
        gen = torch.Generator().manual_seed(seed + 1)
        media = _gemma4_media(spec, gen) if isinstance(spec.multimodal, Gemma4MediaSpec) else _gemma3n_media(spec, gen)
        return _media_batch(spec, media, gen, left_pad)
    length = length or default_length(spec)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, spec.vocab_size, (2, length), generator=gen)
    mask = torch.ones(2, length, dtype=torch.long)
    bos = spec.bos_token_id if spec.bos_token_id is not None else 2
    pad = spec.pad_token_id if spec.pad_token_id is not None else 0
    ids[0, 0] = bos
    ids[1, :left_pad], mask[1, :left_pad] = pad, 0
    ids[1, left_pad] = bos
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    if spec.multimodal is None:
        return Batch(ids, mask, positions)
    pixels, rows = _place_images(spec, ids, mask, gen)
    return Batch(ids, mask, positions, pixels, rows)
