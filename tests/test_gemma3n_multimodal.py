"""Gemma 3n image-audio-text (HF ``Gemma3nForConditionalGeneration``): MobileNet-V5 + ``embed_vision``, the
audio tower + ``embed_audio``, hard media tokens, the merge, and the gate on ``gemma-3n-e2b-mm-tiny``.

HF builds the vision tower through timm, which imports torchvision; PyPI's torchvision loads only beside
torch's CUDA build, so the tests against HF are marked ``timm`` and run in ``tox -e timm``. The rest runs
everywhere: the spec, the released counts (against HF's meta-device count, measured in that env), the
reference's merge, the gate's isolation on the reference itself, and the one-line "unsupported" where
timm is missing.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import configs
from harness import probes
from harness.gate import conform
from harness.synthetic import TRAINED, make_batch, random_state_dict
from reference_impl.spec import ConfigError, Gemma3nMediaSpec, ModelSpec
from reference_impl.weights import build, count_parameters, expected_shapes

TINY = "gemma-3n-e2b-mm-tiny"


def _has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except Exception:  # noqa: BLE001 - torchvision raises RuntimeError beside a CPU-only torch
        return False
    return True


@pytest.fixture(scope="module")
def tiny():
    spec = ModelSpec.from_hf_config(configs.hf_config(TINY))
    state = random_state_dict(spec, 0)
    return spec, state, build(spec, state), make_batch(spec, 0)


# HF Gemma3nForConditionalGeneration built on the meta device from these configs, model.parameters() counted
# (transformers 5.23, timm 1.0.31, tox -e timm; test_hf_counts_equal_the_reference re-measures the twin there)
HF_COUNTS = {"gemma-3n-e2b-mm": 5_418_464_192, "gemma-3n-e4b-mm": 7_818_517_072}


@pytest.mark.parametrize("name", sorted(HF_COUNTS))
def test_released_counts_equal_hf_and_match_the_published_totals(name):
    data = configs.load(name)
    total = count_parameters(ModelSpec.from_hf_config(configs.hf_config(name)))["total"]
    assert total == HF_COUNTS[name]
    published = data["published_params"]
    assert abs(total - published["total"]) <= published["tolerance"]["total"], (total, published)


def test_spec_reads_the_media_fields():
    spec = ModelSpec.from_hf_config(configs.hf_config(TINY))
    mm = spec.multimodal
    assert isinstance(mm, Gemma3nMediaSpec) and spec.gemma3n is not None
    assert (mm.vision_tokens, mm.audio_tokens, mm.vision_offset, mm.audio_offset) == (16, 12, 448, 480)
    assert mm.placeholder_ids == (449, 481) and mm.block_ids == () and mm.bidirectional == "none"
    full = ModelSpec.from_hf_config(configs.hf_config("gemma-3n-e2b-mm")).multimodal
    assert (full.vision_tokens, full.audio_tokens, full.image_token_id, full.audio_token_id) == (256, 188, 262_145, 262_273)


@pytest.mark.parametrize("change, field", [
    ({"vision_soft_tokens_per_image": 15}, "vision_soft_tokens_per_image"),
    ({"image_token_id": 3}, "image_token_id"),
    ({"audio_config": {"vocab_offset": 470, "vocab_size": 32}}, "vocab_offset"),
    ({"vision_config": {"model_type": "siglip_vision_model"}}, "vision_config.model_type"),
])
def test_bad_media_fields_are_one_line_errors_naming_them(change, field):
    config = configs.hf_config(TINY)
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError, match=field) as info:
        ModelSpec.from_hf_config(config)
    assert "\n" not in str(info.value)


def test_probes_cover_both_towers_and_the_merge(tiny):
    spec, _, model, batch = tiny
    names = probes.for_spec(spec)
    assert names[:2] == ["vision.embed", "vision.layers.0.out"] and "vision.layers.83.out" in names
    assert names.index("audio.proj") < names.index("embed") < names.index("merge") < names.index("altup_streams")
    assert probes.upstream_values(spec, "vision.pool") == ["vision.layers.44.out", "vision.layers.83.out"]
    assert probes.upstream_values(spec, "merge") == ["embed", "vision.proj", "audio.proj"]
    assert probes.upstream_values(spec, "altup_streams") == ["merge"]
    assert probes.upstream_values(spec, "layers.0.ple_input")[-1] == "merge"
    capture: dict = {}
    model(batch.input_ids, batch.attention_mask, batch.position_ids, capture=capture, **batch.media)
    assert set(names) <= set(capture)
    assert capture["vision.pool"].shape == (2, 16, 2048) and capture["vision.proj"].shape == (2, 16, spec.hidden_size)
    assert capture["audio.proj"].shape[:2] == (2, 3)  # 41 mel frames (41, 33 real): ceil(ceil(T/2)/2) frames, every 4th


def test_merge_puts_hard_and_soft_tokens_where_hf_does(tiny):
    """Hard media tokens (here <eoi> 448 and <eoa> 480) take their embedder's hard path; image placeholders
    take the images' tokens in order; each clip fills its 12 placeholders, its padding and tail with the
    embedding of the last audio id."""
    spec, _, model, batch = tiny
    mm, media = spec.multimodal, model.media
    capture: dict = {}
    model(batch.input_ids, batch.attention_mask, batch.position_ids, capture=capture, **batch.media)
    ids, merged, embedded = batch.input_ids, capture["merge"], capture["embed"]
    text = ids < mm.vision_offset
    assert torch.equal(merged[text], embedded[text])
    eoi = ids == mm.eoi_token_id
    assert eoi.sum() == 2  # (computed over 2 rows here, over the whole batch in the model: equal to rounding)
    torch.testing.assert_close(merged[eoi], media.embed_vision(ids=ids[eoi]), rtol=1e-6, atol=1e-6)
    assert not torch.equal(merged[eoi], embedded[eoi])
    image = ids == mm.image_token_id
    assert torch.equal(merged[image], capture["vision.proj"].reshape(-1, spec.hidden_size))
    audio = merged[ids == mm.audio_token_id].reshape(2, mm.audio_tokens, -1)
    pad = media.audio.embed_audio(ids=torch.tensor([[spec.vocab_size - 1]]))[0, 0]
    assert torch.equal(audio[0, 3:], pad.expand(9, -1)) and not torch.equal(audio[0, 2], pad)


def test_a_wrong_placeholder_count_is_a_one_line_error(tiny):
    spec, _, model, batch = tiny
    ids = batch.input_ids.clone()
    ids[0, (ids[0] == spec.multimodal.image_token_id).nonzero()[0, 0]] = 5
    with pytest.raises(ValueError, match="31 image placeholder tokens for 32 image soft tokens"):
        model(ids, batch.attention_mask, batch.position_ids, **batch.media)


def test_every_probe_isolated_against_the_reference_itself():
    """The reference as a candidate: every media probe is recomputed from the probe(s) before it, the fusion
    from its two taps, the merge from embed and both projections; all bit-exact in both dtypes."""
    for dtype in ("float32", "bfloat16"):
        result = conform(TINY, candidate="reference", dtype=dtype)
        assert result.passed and result.not_run is None, result.verdict()
        assert all(p.isolated for p in result.probes if p.name not in ("embed", "logits", "vision.embed", "audio.embed")), \
            [p.name for p in result.probes if not p.isolated]
        assert all(p.metrics.get("max_abs") == 0 for p in result.probes), result.standing()


@pytest.mark.skipif(_has_timm(), reason="timm imports here: the HF run is judged (tox -e timm)")
def test_without_timm_hf_is_unsupported_in_one_line_not_a_failure():
    result = conform(TINY, candidate="hf")
    assert result.not_run is not None and "timm" in result.not_run and "\n" not in result.not_run
    assert result.passed and result.error is None and not result.probes
    assert result.verdict().startswith(f"UNSUPPORTED {TINY} [float32]")


@pytest.mark.timm
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gate_against_hf_is_bit_exact_at_every_probe(dtype):
    pytest.importorskip("timm")
    result = conform(TINY, candidate="hf", dtype=dtype)
    assert result.passed and result.error is None and result.not_run is None, result.verdict()
    assert len(result.probes) == len(probes.for_spec(ModelSpec.from_hf_config(configs.hf_config(TINY))))
    judged = [p for p in result.probes if p.status == "pass"]
    assert len(judged) == len(result.probes), result.unsupported
    assert all(p.metrics.get("max_abs") == 0 for p in judged), result.standing()


@pytest.mark.timm
def test_hf_counts_equal_the_reference():
    """HF's state dict names and shapes are the reference's, and the released configs' meta-device counts
    are the ones pinned in HF_COUNTS."""
    pytest.importorskip("timm")
    from transformers import AutoModelForCausalLM

    from harness.adapters.hf import hf_config_object

    for name in [TINY, *HF_COUNTS]:
        config = configs.hf_config(name)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config_object(config))
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
        assert shapes == expected_shapes(ModelSpec.from_hf_config(config)), name
        if name in HF_COUNTS:
            assert sum(p.numel() for p in model.parameters()) == HF_COUNTS[name]


def test_trained_like_weights_stay_finite(tiny):
    """bf16 runs get the trained-like conditioning: through 84 MobileNet blocks the map stays finite."""
    spec = tiny[0]
    model = build(spec, random_state_dict(spec, 0, TRAINED), torch.bfloat16)
    batch = tiny[3]
    capture: dict = {}
    model(batch.input_ids, batch.attention_mask, batch.position_ids, capture=capture, **batch.media)
    assert all(torch.isfinite(v.float()).all() for v in capture.values())


def test_timm_env_is_declared():
    """tox.ini's timm env runs these tests with the torch/torchvision pair whose torchvision loads."""
    text = (configs.CONFIG_DIR.parent / "tox.ini").read_text()
    assert "[testenv:timm]" in text and "torchvision==0.29.1" in text and "tests/test_gemma3n_multimodal.py" in text
    assert importlib.util.find_spec("reference_impl.mobilenet_v5") is not None


# ---- the mutation suite (HF subclasses: tox -e timm) ----

def test_mutants_are_distinct_and_cover_the_media_path():
    from tests import mutants_gemma3n_multimodal as mutants

    assert len(mutants.MUTANTS) >= 8
    assert len({m.BUG for m in mutants.MUTANTS}) == len({m.__name__ for m in mutants.MUTANTS}) == len(mutants.MUTANTS)
    assert {m.EXPECTED for m in mutants.MUTANTS} >= {"vision.embed", "vision.pool", "vision.proj", "merge",
                                                    "layers.0.ple_input"}
    names = probes.for_spec(ModelSpec.from_hf_config(configs.hf_config(TINY)))
    assert all(m.MODEL == TINY and m.EXPECTED in names and m.SOURCE for m in mutants.MUTANTS)


def _mutants():
    from tests import mutants_gemma3n_multimodal as mutants

    return mutants.MUTANTS


@pytest.mark.timm
@pytest.mark.parametrize("cls", _mutants(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mutant_caught_at_its_probe(cls, dtype):
    pytest.importorskip("timm")
    from tests.mutant_checks import check_caught

    if dtype == "bfloat16" and not cls.BF16:
        pytest.skip("below bf16 rounding: gated in float32")
    check_caught(cls, dtype)
