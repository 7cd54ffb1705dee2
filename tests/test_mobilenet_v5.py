"""The from-scratch MobileNet-V5 (``reference_impl/mobilenet_v5.py``) against timm 1.0.31's
``mobilenetv5_300m_enc``: structure and parameter count, strict loading, config errors, and (timm tests,
``-m timm``) every probe bit-exact in float32 and bfloat16.

timm's init hides bugs (layer-scale gammas 1e-5, unit norm weights, zero biases), so every tensor is
randomised before comparing: gammas ~ U(0.5, 1.5), norm weights ~ 1 + 0.2·N, biases ~ 0.1·N, conv weights
~ N / sqrt(fan_in), which keeps activations O(1) through the 84 blocks (asserted).

The tiny configuration: ``channel_multiplier=0.0625`` (stage widths 8 / 16 / 40 / 80, the stem stays 64,
7.3 M parameters; head counts, key dims and the 2048-channel MSFA are not scaled) at 96 px, batch 2. Every
input size gives a 16×16 output (the MSFA bilinear-resizes when the stage-2 map is not a multiple of 16),
so the sizes below are chosen to cover the MSFA's three paths and the 'same' padding cases: 96 (even sides,
bilinear upsample), 97 (odd sides), 96×128 (non-square), 256 (stage 2 already 16×16), 512 and 768 (2×2 and
3×3 average pool; 768 is Gemma 3n's input); ``msfa_output_resolution`` (HF ``model_args``, used by
``configs/gemma-3n-e2b-mm-tiny.json``) is checked separately, directly and through HF's ``TimmWrapperModel``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from reference_impl.mobilenet_v5 import (
    MobileNetV5,
    MobileNetV5ConfigError,
    MobileNetV5Spec,
    MobileNetV5WeightError,
)

ARCH = "mobilenetv5_300m_enc"
TINY = 0.0625
HF_PREFIX = "model.vision_tower.timm_model."
FULL_PARAMS = 294_126_912  # sum(p.numel() for p in timm.create_model(ARCH).parameters()), timm 1.0.31
DTYPES = [torch.float32, torch.bfloat16]


def _meta(spec: MobileNetV5Spec) -> MobileNetV5:
    with torch.device("meta"):
        return MobileNetV5(spec)


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor random, in ranges that keep activations O(1) (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith(".gamma"):
            t = 0.5 + torch.rand(shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:  # every other 1-D tensor is a norm weight
            t = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        else:
            fan_in = shape[1] * shape[2] * shape[3]
            t = torch.randn(shape, generator=gen) / fan_in**0.5
        out[name] = t
    return out


# ---------------------------------------------------------------------------------------------------
# Structure, loading and config (no timm needed)
# ---------------------------------------------------------------------------------------------------


def test_full_size_structure_and_parameter_count():
    tower = _meta(MobileNetV5Spec())
    shapes = _shapes(tower)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == FULL_PARAMS
    assert len(shapes) == 548  # timm's state_dict: parameters only, no buffers
    assert [len(stage) for stage in tower.blocks] == [3, 5, 37, 39]
    assert tower.n_blocks == 84 and tower.msfa_taps == (44, 83)  # last blocks of stages 2 and 3
    assert shapes["conv_stem.conv.weight"] == (64, 3, 3, 3) and shapes["conv_stem.conv.bias"] == (64,)
    assert shapes["blocks.2.9.attn.key.down_conv.weight"] == (640, 1, 3, 3)  # kv stride 2 in stage 2
    assert "blocks.3.1.attn.key.down_conv.weight" not in shapes  # kv stride 1 in stage 3
    assert shapes["blocks.3.1.attn.query.proj.weight"] == (16 * 96, 1280, 1, 1)
    assert shapes["msfa.ffn.pw_exp.conv.weight"] == (3840, 1920, 1, 1)
    assert shapes["msfa.ffn.pw_proj.conv.weight"] == (2048, 3840, 1, 1)
    assert "msfa.ffn.layer_scale.gamma" not in shapes and "blocks.0.0.layer_scale.gamma" not in shapes


@pytest.mark.parametrize("multiplier, widths, msfa_in", [  # measured with timm 1.0.31
    (TINY, (8, 16, 40, 80), 120), (0.01, (8, 8, 8, 16), 24), (0.25, (32, 64, 160, 320), 480)])
def test_channel_rounding(multiplier, widths, msfa_in):
    tower = _meta(MobileNetV5Spec(channel_multiplier=multiplier))
    shapes = _shapes(tower)
    assert shapes["conv_stem.conv.weight"][0] == 64  # fix_stem: not scaled when the multiplier is < 1
    assert tuple(shapes[f"blocks.{s}.{len(stage) - 1}.{'bn2' if s == 0 else 'pw_proj.bn'}.weight"][0]
                 for s, stage in enumerate(tower.blocks)) == widths
    assert shapes["msfa.ffn.pw_exp.conv.weight"][1] == msfa_in


def _tiny_state(prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in _random_state(_shapes(_meta(MobileNetV5Spec(channel_multiplier=TINY)))).items()}


def test_load_is_strict_and_names_the_tensor():
    spec = MobileNetV5Spec(channel_multiplier=TINY)
    state = _tiny_state(HF_PREFIX)
    state["model.language_model.embed_tokens.weight"] = torch.zeros(3, 4)  # other prefixes are ignored
    tower = MobileNetV5.load(spec, state, prefix=HF_PREFIX, dtype=torch.bfloat16)
    assert not tower.training and tower.dtype == torch.bfloat16
    assert torch.equal(tower.blocks[2][9].attn.key.proj.weight,
                       state[HF_PREFIX + "blocks.2.9.attn.key.proj.weight"].to(torch.bfloat16))

    name = HF_PREFIX + "blocks.2.9.attn.value.norm.weight"
    missing = {k: v for k, v in state.items() if k != name}
    with pytest.raises(MobileNetV5WeightError, match="missing tensor .*blocks.2.9.attn.value.norm.weight"):
        MobileNetV5.load(spec, missing, prefix=HF_PREFIX)
    with pytest.raises(MobileNetV5WeightError, match=r"blocks.1.0.layer_scale.gamma.* has shape \(17,\), expected \(16,\)"):
        MobileNetV5.load(spec, {**state, HF_PREFIX + "blocks.1.0.layer_scale.gamma": torch.zeros(17)}, prefix=HF_PREFIX)
    with pytest.raises(MobileNetV5WeightError, match="unexpected tensor .*blocks.0.0.layer_scale.gamma"):
        MobileNetV5.load(spec, {**state, HF_PREFIX + "blocks.0.0.layer_scale.gamma": torch.zeros(8)}, prefix=HF_PREFIX)
    with pytest.raises(MobileNetV5WeightError, match="missing tensor 'conv_stem.conv.weight'"):
        MobileNetV5.load(spec, state)  # no prefix: the names do not line up


def test_config_errors_name_the_field():
    assert MobileNetV5Spec.from_model_args(ARCH, None) == MobileNetV5Spec()
    assert MobileNetV5Spec.from_model_args(ARCH, {"channel_multiplier": 0.5}).channel_multiplier == 0.5
    with pytest.raises(MobileNetV5ConfigError, match="architecture 'mobilenetv5_base'"):
        MobileNetV5Spec.from_model_args("mobilenetv5_base", None)
    with pytest.raises(MobileNetV5ConfigError, match="architecture 'resnet50'"):
        MobileNetV5Spec(architecture="resnet50")
    with pytest.raises(MobileNetV5ConfigError, match="model_args key 'drop_path_rate'"):
        MobileNetV5Spec.from_model_args(ARCH, {"channel_multiplier": 0.5, "drop_path_rate": 0.1})
    for bad in (0, -1.0, "1.0", True, float("nan")):
        with pytest.raises(MobileNetV5ConfigError, match="channel_multiplier"):
            MobileNetV5Spec.from_model_args(ARCH, {"channel_multiplier": bad})
    assert MobileNetV5Spec.from_model_args(ARCH, {"msfa_output_resolution": 4}).msfa_resolution == 4
    for bad in (0, 2.0, True):
        with pytest.raises(MobileNetV5ConfigError, match="msfa_output_resolution"):
            MobileNetV5Spec.from_model_args(ARCH, {"msfa_output_resolution": bad})


@pytest.mark.parametrize("dtype", DTYPES)
def test_output_shape_and_probes_tiny(dtype):
    tower = MobileNetV5.load(MobileNetV5Spec(channel_multiplier=TINY), _tiny_state(), dtype=dtype)
    capture = {}
    out = tower(torch.rand(2, 3, 64, 80), capture)
    assert out.shape == (2, 2048, 16, 16) and out.dtype == dtype and torch.isfinite(out).all()
    assert len(capture) == tower.n_blocks + 2 and capture["vision.pool"] is out
    assert capture["vision.embed"].shape == (2, 64, 32, 40)
    assert capture[f"vision.layers.{tower.msfa_taps[0]}.out"].shape == (2, 40, 4, 5)
    assert capture[f"vision.layers.{tower.n_blocks - 1}.out"].shape == (2, 80, 2, 3)


# ---------------------------------------------------------------------------------------------------
# Against timm (tox -e timm)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm():
    return pytest.importorskip("timm")


@pytest.fixture(scope="module")
def pair(timm):
    """(state dict, {dtype: (timm model, our model)}) at the tiny multiplier, every tensor random."""
    net = timm.create_model(ARCH, pretrained=False, channel_multiplier=TINY).eval()
    state = _random_state(_shapes(net))
    net.load_state_dict(state, strict=True)
    spec = MobileNetV5Spec(channel_multiplier=TINY)
    models = {dt: (copy.deepcopy(net).to(dt), MobileNetV5.load(spec, state, dtype=dt)) for dt in DTYPES}
    return state, models


def _timm_probes(net, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """timm's forward (HF's ``forward_features``) with the stem, every block and the MSFA hooked."""
    probes = {}

    def hook(name):
        return lambda module, args, out: probes.__setitem__(name, out)

    modules = [("vision.embed", net.conv_stem), ("vision.pool", net.msfa)]
    modules += [(f"vision.layers.{i}.out", blk) for i, blk in enumerate(b for stage in net.blocks for b in stage)]
    handles = [m.register_forward_hook(hook(name)) for name, m in modules]
    try:
        with torch.no_grad():
            out = net.forward_features(pixels)
    finally:
        for h in handles:
            h.remove()
    return out, probes


def _pixels(h: int, w: int, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(h * 1000 + w))


@pytest.mark.timm
@pytest.mark.parametrize("multiplier", [1.0, TINY, 0.01, 0.25, 1.25])
def test_state_dict_names_and_shapes_equal_timm(timm, multiplier):
    net = timm.create_model(ARCH, pretrained=False, channel_multiplier=multiplier, device="meta")
    assert _shapes(_meta(MobileNetV5Spec(channel_multiplier=multiplier))) == _shapes(net)
    assert list(net.buffers()) == []
    if multiplier == 1.0:
        assert sum(p.numel() for p in net.parameters()) == FULL_PARAMS


@pytest.mark.timm
@pytest.mark.parametrize("size", [(96, 96), (97, 97), (96, 128), (256, 256), (512, 512), (768, 768)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_probe_bit_exact(pair, size, dtype):
    """HF casts the pixels to the tower dtype (tw:246) and runs ``forward_features``; ours gets float32
    pixels and casts them itself."""
    net, ours = pair[1][dtype]
    pixels = _pixels(*size, batch=1 if size[0] >= 512 else 2)
    ref, probes = _timm_probes(net, pixels.to(dtype))
    capture = {}
    out = ours(pixels, capture)
    assert set(capture) == set(probes)
    for name, value in probes.items():
        assert capture[name].dtype == dtype and torch.equal(capture[name], value), name
    assert torch.equal(out, ref) and out.shape == (pixels.shape[0], 2048, 16, 16)
    last = probes["vision.layers.83.out"].float()
    assert torch.isfinite(last).all() and 0.5 < last.std() < 50  # O(1): the randomisation bites, nothing blows up


@pytest.mark.timm
@pytest.mark.parametrize("multiplier, resolution, px", [
    (0.25, 4, 192),  # configs/gemma-3n-e2b-mm-tiny.json: stage 2 is 12×12, a 3×3 pool to 4×4
    (TINY, 4, 96),  # 6×6 -> 4×4: bilinear *down*sampling (no antialias)
    (TINY, 8, 128),  # stage 2 already 8×8: no resize
], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_msfa_output_resolution_bit_exact(timm, multiplier, resolution, px, dtype):
    """``model_args={"msfa_output_resolution": R}`` (a ``MobileNetV5Encoder`` argument HF forwards)."""
    args = {"channel_multiplier": multiplier, "msfa_output_resolution": resolution}
    net = timm.create_model(ARCH, pretrained=False, **args).eval()
    state = _random_state(_shapes(net), seed=1)
    net.load_state_dict(state, strict=True)
    net = net.to(dtype)
    ours = MobileNetV5.load(MobileNetV5Spec.from_model_args(ARCH, args), state, dtype=dtype)
    pixels = _pixels(px, px)
    ref, probes = _timm_probes(net, pixels.to(dtype))
    capture = {}
    out = ours(pixels, capture)
    for name, value in probes.items():
        assert torch.equal(capture[name], value), name
    assert torch.equal(out, ref) and out.shape == (2, 2048, resolution, resolution)


@pytest.mark.timm
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stem_block_and_fuse_in_isolation(pair, dtype):
    """Each stage rerun alone on timm's own input for it equals timm's output."""
    net, ours = pair[1][dtype]
    pixels = _pixels(97, 97)
    ref, probes = _timm_probes(net, pixels.to(dtype))
    assert torch.equal(ours.stem(pixels), probes["vision.embed"])
    prev = probes["vision.embed"]
    for i in range(ours.n_blocks):
        cur = probes[f"vision.layers.{i}.out"]
        assert torch.equal(ours.block(i, prev), cur), i
        prev = cur
    taps = [probes[f"vision.layers.{i}.out"] for i in ours.msfa_taps]
    assert torch.equal(ours.fuse(taps), probes["vision.pool"]) and torch.equal(ours.fuse(taps), ref)


@pytest.mark.timm
@pytest.mark.parametrize("model_args, px", [
    ({"channel_multiplier": TINY}, 96),
    ({"channel_multiplier": 0.25, "msfa_output_resolution": 4}, 192),  # configs/gemma-3n-e2b-mm-tiny.json
], ids=["tiny", "mm-tiny-config"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hf_timm_wrapper_bit_exact(timm, model_args, px, dtype):
    """Through HF itself: ``Gemma3nVisionConfig`` → ``AutoModel`` (``TimmWrapperModel``), its state dict
    under HF's prefix, ``from_config(dtype=)`` as ``from_pretrained(dtype=)`` builds it; float32 pixels in,
    as the image processor gives them (HF casts them, tw:246)."""
    pytest.importorskip("transformers")
    from transformers import AutoModel
    from transformers.models.gemma3n.configuration_gemma3n import Gemma3nVisionConfig

    cfg = Gemma3nVisionConfig(model_args=model_args)
    hf = AutoModel.from_config(cfg, dtype=dtype).eval()
    state = _random_state(_shapes(hf.timm_model), seed=2)
    hf.load_state_dict({"timm_model." + k: v for k, v in state.items()}, strict=True)
    spec = MobileNetV5Spec.from_model_args(cfg.architecture, cfg.model_args)
    ours = MobileNetV5.load(spec, {HF_PREFIX + k: v for k, v in state.items()}, prefix=HF_PREFIX, dtype=dtype)
    pixels = _pixels(px, px)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, do_pooling=False, return_dict=True).last_hidden_state
    assert ref.dtype == dtype and torch.equal(ours(pixels), ref)
