"""The from-scratch audio path (``reference_impl/audio.py``) against HF: features, every probe of the
Gemma 4 audio tower and its soft tokens (float32 and bfloat16, bit-exact), strict loading, token counts.

The HF tower is built from a tiny audio config with the released structure (eager) and EVERY tensor
randomised: HF's default init hides bugs (zero ``per_dim_scale``, unit norms, infinite clip bounds), so
the clip bounds are set inside the observed activation range (asserted to clip), ``gradient_clipping``
is small enough to bite, the softcap is small enough to bend logits, and ``rms_norm_eps`` is not the
1e-6 that half of HF's audio norms hard-code.
"""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch

from reference_impl import audio

SR = 16000
LENGTHS = (23457, 16000)  # two clips: one not a multiple of the 160-sample hop (nor of 128), one exact


def _waveform(n: int, seed: int) -> np.ndarray:
    """Sines + noise, float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    wave = 0.4 * np.sin(2 * np.pi * 220.0 * t) + 0.2 * np.sin(2 * np.pi * 1870.0 * t + 0.3) + 0.05 * rng.standard_normal(n)
    return wave.astype(np.float32)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# ---------------------------------------------------------------------------------------------------
# Features and counts
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extractor():
    pytest.importorskip("transformers")
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    return Gemma4AudioFeatureExtractor()


@pytest.mark.parametrize("n", [*LENGTHS, 1000, 321])
def test_log_mel_features_bit_exact(extractor, n):
    wave = _waveform(n, seed=n)
    hf = extractor([wave], return_tensors="pt")  # a bare 1-D array crashes HF's extractor (fe4:216)
    feats, mask = audio.log_mel_features(wave, SR)
    assert torch.equal(feats, hf["input_features"][0]) and feats.dtype == torch.float32
    assert torch.equal(mask, hf["input_features_mask"][0])
    assert mask.any() and feats[~mask].abs().max() == 0 if (~mask).any() else True


def test_batched_features_equal_hf_batch(extractor):
    waves = [_waveform(n, seed=n) for n in LENGTHS]
    hf = extractor(waves, return_tensors="pt")
    feats, mask = audio.batch_features([audio.log_mel_features(w, SR) for w in waves])
    assert torch.equal(feats, hf["input_features"]) and torch.equal(mask, hf["input_features_mask"])


def test_feature_options_bit_exact():
    pytest.importorskip("transformers")
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    options = {"preemphasis": 0.97, "input_scale_factor": 2.0, "feature_size": 64, "max_frequency": 7600.0,
               "per_bin_mean": list(np.linspace(-1, 1, 64)), "per_bin_stddev": list(np.linspace(0.5, 2, 64))}
    wave = _waveform(5000, seed=1).astype(np.float64)  # float64 in: HF casts to float32 after padding
    hf = Gemma4AudioFeatureExtractor(**options)([wave], return_tensors="pt")
    feats, mask = audio.log_mel_features(wave, SR, options)
    assert torch.equal(feats, hf["input_features"][0]) and torch.equal(mask, hf["input_features_mask"][0])
    options["preemphasis_htk_flavor"] = False
    hf = Gemma4AudioFeatureExtractor(**options)([wave], return_tensors="pt")
    assert torch.equal(audio.log_mel_features(wave, SR, options)[0], hf["input_features"][0])


COUNT_LENGTHS = (0, 100, 160, 161, 320, 321, 480, 481, 640, 641, 1000, 16000, 16001, 23457, 479_999, 480_000, 480_001, 500_000)


def test_soft_token_count_equals_hf(extractor):
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    proc = types.SimpleNamespace(feature_extractor=extractor, audio_seq_length=750,
                                 boa_token="<boa>", eoa_token="<eoa>", audio_token="@")
    for n in COUNT_LENGTHS:
        ours = audio.soft_token_count(n)
        assert ours == Gemma4Processor._compute_audio_num_tokens(proc, np.zeros(n), SR), n  # the vLLM / length rule
        if n < 321 - 160:  # HF's extractor cannot frame a clip this short
            assert ours == 0
            continue
        wave = _waveform(n, seed=3)
        hf_mask = extractor([wave], return_tensors="pt")["input_features_mask"]
        text = Gemma4Processor.replace_audio_token(proc, {"input_features_mask": hf_mask}, 0)  # the processor's mask rule
        assert ours == text.count("@"), n
        mask = audio.log_mel_features(wave, SR)[1]
        assert ours == int(audio.Gemma4AudioTower.frame_mask(None, mask[None]).sum()), n
    assert audio.soft_token_count(16001) == 25  # not ceil(1000.06 ms / 40 ms) = 26 as the processor doc says


# ---------------------------------------------------------------------------------------------------
# The tower
# ---------------------------------------------------------------------------------------------------

TEXT_HIDDEN = 64


def _audio_config(**over):
    from transformers import Gemma4AudioConfig

    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, subsampling_conv_channels=[128, 4],
              conv_kernel_size=5, attention_chunk_size=12, attention_context_left=13, attention_context_right=0,
              attention_logit_cap=4.0, gradient_clipping=1.5, rms_norm_eps=1e-5, output_proj_dims=48,
              use_clipped_linears=True)
    kw.update(over)
    cfg = Gemma4AudioConfig(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def _full_config(audio_cfg) -> dict:
    return {"audio_config": audio_cfg.to_dict(), "text_config": {"hidden_size": TEXT_HIDDEN}}


def _randomise(tower, embedder, features, mask):
    """Every tensor random; clip bounds set inside the activation ranges seen with infinite bounds."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in [*tower.named_parameters(), *embedder.named_parameters()]:
            if name.endswith("norm.weight") or "layer_norm" in name or name.endswith("norm_out.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("per_dim_scale") or name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / fan_in**0.5))
        seen: dict = {}
        hooks = [m.register_forward_hook(lambda m, a, o: seen.__setitem__(m, (a[0].detach(), o.detach())))
                 for m in tower.modules() if isinstance(m, Gemma4ClippableLinear)]
        tower(features, mask)
        for h in hooks:
            h.remove()
        for m, (x, y) in seen.items():
            lo, hi = (torch.rand(2, generator=gen) * 0.4 + 0.4).tolist()  # clip at 40-80 % of the extremes
            m.input_min.fill_(x.min().item() * lo)
            m.input_max.fill_(x.max().item() * hi)
            lo, hi = (torch.rand(2, generator=gen) * 0.4 + 0.4).tolist()
            m.output_min.fill_(y.min().item() * lo)
            m.output_max.fill_(y.max().item() * hi)
    return seen


def _hf_run(tower, embedder, features, mask) -> dict:
    cap: dict = {}
    hooks = [tower.subsample_conv_projection.register_forward_hook(lambda m, a, o: cap.__setitem__("audio.embed", o[0]))]
    for i, layer in enumerate(tower.layers):
        hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: cap.__setitem__(f"audio.layers.{i}.out", o)))
    with torch.no_grad():
        out = tower(features, mask)
        cap["audio.out"] = out.last_hidden_state
        cap["audio.proj"] = embedder(out.last_hidden_state)
        cap["tokens"] = cap["audio.proj"][out.attention_mask]
        cap["frame_mask"] = out.attention_mask
    for h in hooks:
        h.remove()
    return cap


@pytest.fixture(scope="module")
def features():
    return audio.batch_features([audio.log_mel_features(_waveform(n, seed=n), SR) for n in LENGTHS])


def _build_hf(audio_cfg, features):
    pytest.importorskip("transformers")
    from transformers.models.gemma4.modeling_gemma4 import Gemma4AudioModel, Gemma4MultimodalEmbedder

    torch.manual_seed(0)
    tower = Gemma4AudioModel(audio_cfg).eval()
    embedder = Gemma4MultimodalEmbedder(audio_cfg, types.SimpleNamespace(hidden_size=TEXT_HIDDEN)).eval()
    seen = _randomise(tower, embedder, *features)
    state = {f"model.audio_tower.{k}": v for k, v in tower.state_dict().items()}
    state.update({f"model.embed_audio.{k}": v for k, v in embedder.state_dict().items()})
    return tower, embedder, state, seen


@pytest.fixture(scope="module")
def hf_tiny(features):
    return (_audio_config(), *_build_hf(_audio_config(), features))


def test_clip_bounds_and_clamps_bite(hf_tiny, features):
    cfg, tower, embedder, state, seen = hf_tiny
    clipped = [((x < m.input_min) | (x > m.input_max)).float().mean().item() for m, (x, _) in seen.items()]
    assert min(clipped) > 0, "every clipped linear must clip some inputs"
    ref = audio.Gemma4AudioTower.from_hf(_full_config(cfg), state)
    cap: dict = {}
    ref(*features, capture=cap)
    assert cap["audio.layers.0.out"].abs().max() > cfg.gradient_clipping  # the residual clamps act


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tower_probes_bit_exact(hf_tiny, features, dtype):
    cfg, tower, embedder, state, _ = hf_tiny
    # .to(dtype) casts the buffers as from_pretrained(dtype=...) does (_from_config(dtype=...) would not).
    hf = _hf_run(copy.deepcopy(tower).to(dtype), copy.deepcopy(embedder).to(dtype), *features)
    ref = audio.Gemma4AudioTower.from_hf(_full_config(cfg), state, dtype)
    cap: dict = {}
    tokens = ref(*features, capture=cap)
    names = ["audio.embed", *(f"audio.layers.{i}.out" for i in range(cfg.num_hidden_layers)), "audio.out", "audio.proj"]
    diffs = {name: _max_abs(cap[name], hf[name]) for name in names}
    diffs["tokens"] = _max_abs(tokens, hf["tokens"])
    assert all(d == 0.0 for d in diffs.values()), diffs
    assert torch.equal(ref.frame_mask(features[1]), hf["frame_mask"])
    assert tokens.shape[0] == sum(audio.soft_token_count(n) for n in LENGTHS)
    # Each stage alone, on HF's own input, gives HF's output bit for bit.
    x, m = ref.embed(*features)
    assert torch.equal(x, hf["audio.embed"]) and torch.equal(m, hf["frame_mask"])
    for i in range(cfg.num_hidden_layers):
        given = hf["audio.embed"] if i == 0 else hf[f"audio.layers.{i - 1}.out"]
        assert torch.equal(ref.layer(i, given, hf["frame_mask"]), hf[f"audio.layers.{i}.out"]), i
    assert torch.equal(ref.output(hf[f"audio.layers.{cfg.num_hidden_layers - 1}.out"]), hf["audio.out"])
    assert torch.equal(ref.project_from(hf["audio.out"]), hf["audio.proj"])


def test_tower_right_context_and_odd_chunk_fp32(features):
    """A non-released geometry: chunk 4, 5 past frames, 2 future frames (C = 11, P = 6)."""
    cfg = _audio_config(attention_chunk_size=4, attention_context_left=6, attention_context_right=2, num_hidden_layers=1,
                        hidden_act="gelu_pytorch_tanh")
    tower, embedder, state, _ = _build_hf(cfg, features)
    hf = _hf_run(tower, embedder, *features)
    cap: dict = {}
    tokens = audio.Gemma4AudioTower.from_hf(_full_config(cfg), state)(*features, capture=cap)
    assert torch.equal(tokens, hf["tokens"])
    assert all(torch.equal(cap[k], hf[k]) for k in ("audio.embed", "audio.layers.0.out", "audio.out"))


def test_names_match_full_model_and_loading_is_strict(hf_tiny):
    pytest.importorskip("transformers")
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    cfg, _, _, state, _ = hf_tiny
    full = Gemma4Config(
        text_config=dict(hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, global_head_dim=16, vocab_size=128,
                         hidden_size_per_layer_input=8, vocab_size_per_layer_input=128, layer_types=["full_attention"]),
        audio_config=cfg.to_dict(), vision_config=None)
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(full)
    hf_names = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(("model.audio_tower.", "model.embed_audio."))}
    assert audio.Gemma4AudioTower.expected_shapes(full.to_dict()) == hf_names == {k: tuple(v.shape) for k, v in state.items()}

    name = "model.audio_tower.layers.1.self_attn.q_proj.input_max"
    with pytest.raises(audio.AudioWeightError, match=name.replace(".", r"\.")):
        audio.Gemma4AudioTower.from_hf(_full_config(cfg), {k: v for k, v in state.items() if k != name})
    name = "model.embed_audio.embedding_projection.weight"
    with pytest.raises(audio.AudioWeightError, match="has shape"):
        audio.Gemma4AudioTower.from_hf(_full_config(cfg), {**state, name: torch.zeros(3, 3)})
    with pytest.raises(audio.AudioWeightError, match="unexpected"):
        audio.Gemma4AudioTower.from_hf(_full_config(cfg), {**state, "model.audio_tower.extra": torch.zeros(1)})
    audio.Gemma4AudioTower.from_hf(_full_config(cfg), {**state, "model.language_model.x": torch.zeros(1)})  # ignored


# ---------------------------------------------------------------------------------------------------
# Gemma 3n
# ---------------------------------------------------------------------------------------------------


def _build_hf_3n(features, **over):
    pytest.importorskip("transformers")
    from transformers import Gemma3nAudioConfig
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioEncoder, Gemma3nMultimodalEmbedder

    kw = dict(hidden_size=32, conf_num_hidden_layers=2, conf_num_attention_heads=4, sscp_conv_channel_size=[8, 4],
              conf_attention_logit_cap=4.0, gradient_clipping=1.5, rms_norm_eps=1e-5, sscp_conv_group_norm_eps=1e-3,
              conf_reduction_factor=4, input_feat_size=128)
    kw.update(over)
    cfg = Gemma3nAudioConfig(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    tower = Gemma3nAudioEncoder(cfg).eval()
    text = types.SimpleNamespace(hidden_size=TEXT_HIDDEN)
    embedder = Gemma3nMultimodalEmbedder(cfg, text).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in [*tower.named_parameters(), *embedder.named_parameters()]:
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("per_dim_scale"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / p[0].numel() ** 0.5))
    state = {f"model.audio_tower.{k}": v for k, v in tower.state_dict().items()}
    state.update({f"model.embed_audio.{k}": v for k, v in embedder.state_dict().items()})
    full = {"audio_config": cfg.to_dict(), "audio_soft_tokens_per_image": 20,
            "text_config": {"hidden_size": TEXT_HIDDEN, "vocab_size": cfg.vocab_offset + cfg.vocab_size}}
    return cfg, tower, embedder, state, full


def _hf_run_3n(tower, embedder, features, mask, soft_tokens, text_vocab):
    """Gemma3nModel.get_audio_features + the merge's padding (m3n:2102-2121), with probes."""
    cap: dict = {}
    hooks = [tower.subsample_conv_projection.register_forward_hook(lambda m, a, o: cap.__setitem__("audio.embed", o))]
    for i, block in enumerate(tower.conformer):
        hooks.append(block.register_forward_hook(lambda m, a, o, i=i: cap.__setitem__(f"audio.layers.{i}.out", o)))
    with torch.no_grad():
        out = tower(features, ~mask)
        cap["audio.out"] = out.last_hidden_state
        feats = cap["audio.proj"] = embedder(inputs_embeds=out.last_hidden_state)
        pad_emb = embedder(input_ids=torch.tensor([[text_vocab - 1]]))
        feats = torch.where(out.audio_mel_mask.unsqueeze(-1), pad_emb, feats)
        b, t, h = feats.shape
        cap["tokens"] = torch.cat((feats, pad_emb.expand(b, soft_tokens - t, h)), dim=1).reshape(-1, h)
    for hook in hooks:
        hook.remove()
    return cap


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma3n_tower_probes_bit_exact(features, dtype):
    from harness.adapters.hf import _as_from_pretrained

    cfg, tower, embedder, state, full = _build_hf_3n(features)
    tower = tower.to(dtype)
    _as_from_pretrained(tower, dtype)  # the fp32 timescales from_pretrained(dtype) holds
    hf = _hf_run_3n(tower, embedder.to(dtype), *features, 20, full["text_config"]["vocab_size"])
    ref = audio.Gemma3nAudioTower.from_hf(full, state, dtype)
    cap: dict = {}
    tokens = ref(*features, capture=cap)
    names = ["audio.embed", *(f"audio.layers.{i}.out" for i in range(cfg.conf_num_hidden_layers)), "audio.out", "audio.proj"]
    diffs = {name: _max_abs(cap[name], hf[name]) for name in names}
    diffs["tokens"] = _max_abs(tokens, hf["tokens"])
    assert all(d == 0.0 for d in diffs.values()), diffs
    x, pad = ref.embed(*features)
    for i in range(cfg.conf_num_hidden_layers):
        given = hf["audio.embed"] if i == 0 else hf[f"audio.layers.{i - 1}.out"]
        assert torch.equal(ref.layer(i, given, pad), hf[f"audio.layers.{i}.out"]), i
    assert torch.equal(ref.project_from(hf["audio.out"]), hf["audio.proj"])


def test_gemma3n_names_and_strict_loading(features):
    pytest.importorskip("transformers")
    cfg, _, _, state, full = _build_hf_3n(features)
    assert audio.Gemma3nAudioTower.expected_shapes(full) == {k: tuple(v.shape) for k, v in state.items()}
    name = "model.audio_tower.conformer.1.attention.attn.relative_position_embedding.pos_proj.weight"
    with pytest.raises(audio.AudioWeightError, match="missing"):
        audio.Gemma3nAudioTower.from_hf(full, {k: v for k, v in state.items() if k != name})


# ---------------------------------------------------------------------------------------------------
# Gemma 3n features
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extractor_3n():
    pytest.importorskip("transformers")
    from transformers.models.gemma3n.feature_extraction_gemma3n import Gemma3nAudioFeatureExtractor

    return Gemma3nAudioFeatureExtractor()


# 0 frames below 513 padded samples; 7000 (41 frames) and 23457 end mid-frame; 16000 is a multiple of 128 and 160
@pytest.mark.parametrize("n", [1, 159, 160, 641, 7000, 16000, 23457, 48000])
def test_log_mel_features_3n_bit_exact(extractor_3n, n):
    wave = _waveform(n, seed=n)
    hf = extractor_3n(wave, return_tensors="pt")  # a bare 1-D array works here (fe3n:302-309)
    feats, mask = audio.log_mel_features_3n(wave, SR)
    assert set(hf) == {"input_features", "input_features_mask"}
    assert torch.equal(feats, hf["input_features"][0]) and feats.dtype == torch.float32
    assert torch.equal(mask, hf["input_features_mask"][0]) and mask.dtype == torch.bool
    assert feats.shape == (max((-(-n // 128) * 128 - 513) // 160 + 1, 0), 128)


def test_batch_features_3n_equal_hf_batch(extractor_3n):
    lengths = (7000, 5210, 23457)
    waves = [_waveform(n, seed=n) for n in lengths]
    hf = extractor_3n(waves, return_tensors="pt", sampling_rate=SR)
    feats, mask = audio.batch_features_3n(waves, SR)
    assert torch.equal(feats, hf["input_features"]) and torch.equal(mask, hf["input_features_mask"])
    # Batching changes a clip's row: more frames, three more of them still real for the 7000-sample clip.
    alone, alone_mask = audio.log_mel_features_3n(waves[0], SR)
    assert (alone.shape[0], int(alone_mask.sum()), int(mask[0].sum())) == (41, 41, 44)
    assert torch.equal(feats[0, :41], alone) and mask[0, 41:44].all() and not mask[0, 44:].any()
    assert feats[1][~mask[1]].ne(0).all()  # padding frames are log(mel_floor)-ish, not zeroed


def test_feature_options_3n_bit_exact():
    pytest.importorskip("transformers")
    from transformers.models.gemma3n.feature_extraction_gemma3n import Gemma3nAudioFeatureExtractor

    options = {"frame_length_ms": 25.0, "hop_length_ms": 12.5, "fft_overdrive": False, "min_frequency": 0.0,
               "max_frequency": 8000.0, "feature_size": 64, "mel_floor": 1e-3, "input_scale_factor": 2.0,
               "per_bin_mean": list(np.linspace(-1, 1, 64)), "per_bin_stddev": list(np.linspace(0.5, 2, 64))}
    wave = _waveform(5000, seed=1).astype(np.float64)  # float64 in: HF casts to float32 after padding
    hf = Gemma3nAudioFeatureExtractor(**options)([wave], return_tensors="pt")
    feats, mask = audio.log_mel_features_3n(wave, SR, options)
    assert torch.equal(feats, hf["input_features"][0]) and torch.equal(mask, hf["input_features_mask"][0])
    for more in ({"preemphasis_htk_flavor": False}, {"preemphasis": 0.0}):
        options |= more
        hf = Gemma3nAudioFeatureExtractor(**options)([wave], return_tensors="pt")
        assert torch.equal(audio.log_mel_features_3n(wave, SR, options)[0], hf["input_features"][0]), more
