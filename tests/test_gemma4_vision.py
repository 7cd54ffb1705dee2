"""reference_impl.gemma4_vision against HF's Gemma 4 vision tower, projector and PIL image processor.

Two tiny towers with the released structures (notes §3.1): E2B/E4B-like (clipped linears, no
standardisation) and 26B/31B-like (standardisation, no clipping, head_dim not a power of two). Every
vision tensor is randomised (HF's init leaves unit norms, a ones position table and infinite clip
bounds, which hide whole bug classes); the clip bounds are finite and the test checks they clip.
"""

from __future__ import annotations

import functools

import pytest
import torch

from reference_impl import gemma4_vision as gv

transformers = pytest.importorskip("transformers")

BUDGET = 70  # the model tests: 630 patches per image keeps eager attention cheap
TEXT = {"vocab_size": 300, "hidden_size": 40, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "global_head_dim": 16,
        "hidden_size_per_layer_input": 0, "layer_types": ["full_attention"], "num_kv_shared_layers": 0}
TOKENS = {"image_token_id": 250, "boi_token_id": 251, "eoi_token_id": 252, "video_token_id": 253,
          "audio_token_id": 254, "boa_token_id": 255, "eoa_token_index": 256}
VARIANTS = {
    "e2b": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "head_dim": 16, "patch_size": 4, "pooling_kernel_size": 3,
            "position_embedding_size": 64, "use_clipped_linears": True, "standardize": False},
    "31b": {"hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 4, "head_dim": 12, "patch_size": 4, "pooling_kernel_size": 3,
            "position_embedding_size": 64, "use_clipped_linears": False, "standardize": True},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _config(variant: str):
    return transformers.Gemma4Config(text_config=TEXT, vision_config=VARIANTS[variant], **TOKENS)


def _randomized(variant: str) -> dict[str, torch.Tensor]:
    """Every vision and projector tensor of the checkpoint, random (seeded per variant)."""
    with torch.device("meta"):
        names = transformers.Gemma4ForConditionalGeneration(_config(variant)).state_dict()
    g = torch.Generator().manual_seed(len(variant))
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    uni = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g)  # noqa: E731
    head_dim = VARIANTS[variant]["head_dim"]
    out = {}
    for name, t in names.items():
        if not name.startswith((gv.TOWER, gv.PROJECTOR)):
            continue
        leaf, shape = name.rsplit(".", 1)[-1], t.shape
        if name.endswith(("linear.weight", "input_proj.weight", "embedding_projection.weight")):
            value = rand(*shape) * shape[1] ** -0.5
        elif name.endswith("position_embedding_table"):
            value = rand(*shape) * 0.35
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            value = (1 + 0.15 * rand(*shape)) * head_dim**-0.25
        elif name.endswith("layernorm.weight"):
            value = 1 + 0.25 * rand(*shape)
        elif leaf in ("input_min", "input_max", "output_min", "output_max"):
            low = 0.4 if "down_proj.input" in name or "o_proj.input" in name else 1.0
            value = uni(low, 2 * low) * (-1 if leaf.endswith("min") else 1)
        elif leaf == "std_bias":
            value = rand(*shape)
        elif leaf == "std_scale":
            value = 1 + 0.1 * rand(*shape)
        else:
            raise AssertionError(f"test does not randomise {name}")
        out[name] = value
    return out


@functools.cache
def _hf(variant: str, dtype_name: str):
    torch.manual_seed(0)
    model = transformers.Gemma4ForConditionalGeneration._from_config(
        _config(variant), attn_implementation="eager", dtype=DTYPES[dtype_name]).eval()
    missing = model.load_state_dict(_randomized(variant), strict=False)
    assert not missing.unexpected_keys
    assert not [k for k in missing.missing_keys if k.startswith((gv.TOWER, gv.PROJECTOR))]
    assert model.model.vision_tower.encoder.rotary_emb.inv_freq.dtype == torch.float32
    return model


@functools.cache
def _reference(variant: str, dtype_name: str):
    return gv.Gemma4VisionTower.from_hf(_config(variant).to_dict(), _randomized(variant), DTYPES[dtype_name])


def _images():
    """A non-square image (downscaled, with padding) and a smaller square one (upscaled), uint8."""
    g = torch.Generator().manual_seed(7)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 50), torch.linspace(0, 1, 170), indexing="ij")
    wide = torch.stack([xs, ys, (xs + ys) / 2]) * 200 + 50 * torch.rand(3, 50, 170, generator=g)
    small = torch.rand(3, 40, 40, generator=g) * 255
    return [wide.clamp(0, 255).to(torch.uint8), small.to(torch.uint8)]


def _processor():
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil()


@functools.cache
def _batch(variant: str):
    v = VARIANTS[variant]
    out = _processor()([im.numpy() for im in _images()], max_soft_tokens=BUDGET, patch_size=v["patch_size"],
                       pooling_kernel_size=v["pooling_kernel_size"], return_tensors="pt")
    return out["pixel_values"], out["image_position_ids"], out["num_soft_tokens_per_image"].tolist()


def _hf_run(variant: str, dtype_name: str):
    """HF's probes: embed and layer outputs (I, P, C), pool (n, C) stripped, proj per image."""
    model = _hf(variant, dtype_name)
    pixel_values, positions, _ = _batch(variant)
    tower, rec, handles = model.model.vision_tower, {}, []
    save = lambda key: lambda mod, args, out: rec.__setitem__(key, out)  # noqa: E731
    handles.append(tower.patch_embedder.register_forward_hook(save("vision.embed")))
    for i, layer in enumerate(tower.encoder.layers):
        handles.append(layer.register_forward_hook(save(f"vision.layers.{i}.out")))
    clipped = {"in": [0, 0], "out": [0, 0]}  # [elements clipped, elements seen]

    def count(kind, value, lo, hi):
        clipped[kind][0] += int(((value < lo) | (value > hi)).sum())
        clipped[kind][1] += value.numel()

    for mod in tower.modules():
        if isinstance(mod, transformers.models.gemma4.modeling_gemma4.Gemma4ClippableLinear) and mod.use_clipped_linears:
            handles.append(mod.register_forward_pre_hook(lambda m, a: count("in", a[0], m.input_min, m.input_max)))
            handles.append(mod.linear.register_forward_hook(
                lambda lin, a, out, m=mod: count("out", out, m.output_min, m.output_max)))
    try:
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values, positions, return_dict=True)
    finally:
        for h in handles:
            h.remove()
    rec["vision.pool"] = features.last_hidden_state
    rec["soft_tokens"] = features.pooler_output
    return rec, clipped


def _diff(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.double() - b.double()).abs()
    return f"max abs {d.max().item():.3g}, max rel {(d / b.double().abs().clamp(min=1e-30)).max().item():.3g}"


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_probe_and_the_soft_tokens_are_bit_exact(variant, dtype_name):
    hf, clipped = _hf_run(variant, dtype_name)
    ref = _reference(variant, dtype_name)
    pixel_values, positions, counts = _batch(variant)
    capture: dict[str, torch.Tensor] = {}
    soft = ref(pixel_values, positions, capture=capture, placeholders=counts)
    mask = ref.token_mask(positions)
    assert sorted(capture) == sorted(["vision.embed", "vision.pool", "vision.proj"]
                                     + [f"vision.layers.{i}.out" for i in range(len(ref.layers))])
    bad = []
    for name, value in capture.items():
        assert value.dim() == 3 and value.dtype == DTYPES[dtype_name], name
        if name in ("vision.pool", "vision.proj"):
            assert not value[~mask].any(), f"{name}: rows HF strips must be 0"
            value = value[mask]
        theirs = torch.cat(hf["soft_tokens"]) if name == "vision.proj" else hf[name]
        if not torch.equal(value, theirs):
            bad.append(f"{name}: {_diff(value, theirs)}")
    assert [t.shape[0] for t in soft] == counts == [t.shape[0] for t in hf["soft_tokens"]]
    for mine, theirs in zip(soft, hf["soft_tokens"], strict=True):
        if not torch.equal(mine, theirs):
            bad.append(f"soft tokens: {_diff(mine, theirs)}")
    assert not bad, f"{variant} {dtype_name}: " + "; ".join(bad)
    if VARIANTS[variant]["use_clipped_linears"]:  # the bounds were exercised, not decorative
        for kind, (n, total) in clipped.items():
            assert 0.001 < n / total < 0.5, f"clip {kind}: {n} of {total} clipped"


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_step_alone_on_hf_inputs(variant, dtype_name):
    """layer / pool_from / project_from / stream rerun one step on HF's own upstream values."""
    hf, _ = _hf_run(variant, dtype_name)
    ref = _reference(variant, dtype_name)
    _, positions, _ = _batch(variant)
    n = len(ref.layers)
    for i in range(n):
        x = hf["vision.embed" if i == 0 else f"vision.layers.{i - 1}.out"]
        assert torch.equal(ref.layer(i, x, positions), hf[f"vision.layers.{i}.out"]), i
    mask = ref.token_mask(positions)
    pooled = ref.pool_from(hf[f"vision.layers.{n - 1}.out"], positions)
    assert torch.equal(pooled[mask], hf["vision.pool"])
    padded = torch.zeros_like(pooled)
    padded[mask] = hf["vision.pool"]
    assert torch.equal(ref.project_from(padded, positions)[mask], torch.cat(hf["soft_tokens"]))
    stream = ref.stream("vision.layers.1.out", lambda name: hf[name], positions)
    assert torch.equal(stream, hf["vision.layers.1.out"])


def test_image_to_patches_matches_the_hf_processor():
    proc, v = _processor(), VARIANTS["e2b"]
    kwargs = {"patch_size": v["patch_size"], "pooling_kernel_size": v["pooling_kernel_size"], "return_tensors": "pt"}
    images = _images() + [torch.randint(0, 256, (3, 36, 48), dtype=torch.uint8)]  # the last: no resize at 140
    for budget in (70, 140):
        want = proc([im.numpy() for im in images], max_soft_tokens=budget, **kwargs)
        pixel_values, positions, counts = gv.images_to_batch(images, budget, v)
        assert torch.equal(pixel_values, want["pixel_values"]), budget
        assert torch.equal(positions, want["image_position_ids"]), budget
        assert counts == want["num_soft_tokens_per_image"].tolist()
        # the same images in [0, 1]: the processor with do_rescale=False
        units = [im.float() / 255 for im in images] + [torch.randint(0, 2, (3, 30, 30)).float()]  # + HF's 0/1 quirk
        want = proc([u.numpy() for u in units], max_soft_tokens=budget, do_rescale=False, **kwargs)
        pixel_values, positions, _ = gv.images_to_batch(units, budget, v)
        assert torch.equal(pixel_values, want["pixel_values"].float()), budget
        assert torch.equal(positions, want["image_position_ids"])


def test_soft_token_layout_follows_the_processor_for_every_budget():
    from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size

    proc, config = _processor(), {}  # released geometry: 16-pixel patches, 3x3 pooling
    sizes = [(123, 517), (517, 123), (300, 300), (20, 2000), (2000, 20), (1, 5000), (768, 1024)]
    for budget in gv.SUPPORTED_BUDGETS:
        for h, w in sizes:
            th, tw, ph, pw, n = gv.soft_token_layout(h, w, budget, config)
            assert (th, tw) == get_aspect_ratio_preserving_size(h, w, 16, budget * 9, 3), (budget, h, w)
            assert (ph, pw, n) == (th // 16, tw // 16, th * tw // (16 * 16 * 9)) and n <= budget
        image = torch.zeros(3, 123, 517, dtype=torch.uint8)  # the non-square one through the processor itself
        want = proc([image.numpy()], max_soft_tokens=budget, return_tensors="pt")
        assert want["num_soft_tokens_per_image"].tolist() == [gv.soft_token_layout(123, 517, budget)[4]]
        assert want["pixel_values"].shape[1] == budget * 9
    assert [gv.soft_token_layout(123, 517, b)[4] for b in gv.SUPPORTED_BUDGETS] == [68, 120, 272, 528, 1088]


def test_a_wrong_budget_is_a_one_line_count_mismatch():
    ref = _reference("e2b", "float32")
    pixel_values, positions, counts = _batch("e2b")
    for placeholders, image in ((140, 0), ([counts[0], counts[1] + 1], 1)):
        with pytest.raises(ValueError) as err:
            ref(pixel_values, positions, placeholders=placeholders)
        wanted = placeholders if isinstance(placeholders, int) else placeholders[image]
        assert str(err.value) == f"image {image}: {counts[image]} soft tokens for {wanted} placeholders"
    with pytest.raises(ValueError, match=r"^soft-token budget 256 is not one of \(70, 140, 280, 560, 1120\)$"):
        gv.image_to_patches(_images()[0], 256, VARIANTS["e2b"])
    with pytest.raises(ValueError, match=r"^629 patches per image is not a multiple of 9 \(pooling 3x3\)$"):
        ref(pixel_values[:, :-1], positions[:, :-1])


def test_expected_shapes_and_strict_loading():
    config = _config("e2b").to_dict()
    with torch.device("meta"):
        hf = transformers.Gemma4ForConditionalGeneration(_config("e2b")).state_dict()
    vision = {k: tuple(v.shape) for k, v in hf.items() if k.startswith((gv.TOWER, gv.PROJECTOR))}
    assert gv.expected_shapes(config) == vision
    with torch.device("meta"):
        hf31 = transformers.Gemma4ForConditionalGeneration(_config("31b")).state_dict()
    assert gv.expected_shapes(_config("31b").to_dict()) == {
        k: tuple(v.shape) for k, v in hf31.items() if k.startswith((gv.TOWER, gv.PROJECTOR))}
    weights = _randomized("e2b")
    name = f"{gv.TOWER}encoder.layers.1.mlp.down_proj.output_max"
    with pytest.raises(gv.VisionWeightError, match=f"^missing tensor '{name}'"):
        gv.Gemma4VisionTower.from_hf(config, {k: v for k, v in weights.items() if k != name})
    name = f"{gv.PROJECTOR}embedding_projection.weight"
    with pytest.raises(gv.VisionWeightError, match=rf"^tensor '{name}' has shape \(40, 31\), expected \(40, 32\)$"):
        gv.Gemma4VisionTower.from_hf(config, {**weights, name: weights[name][:, :31]})
    with pytest.raises(gv.VisionWeightError, match=f"^unexpected tensor '{gv.TOWER}std_bias'"):
        gv.Gemma4VisionTower.from_hf(config, {**weights, f"{gv.TOWER}std_bias": torch.zeros(32)})
