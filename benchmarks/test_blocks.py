"""pytest-benchmark benchmarks of the building blocks of Gemma inference, on the shapes of released models.

Not in pytest's default testpaths: run it by name. A full run (35 s on a loaded 2-core machine, plus 30 s for the
MoE dispatch benchmarks; pytest-benchmark's default --benchmark-max-time=1.0 about doubles that)::

    .venv/bin/python -m pytest benchmarks/test_blocks.py --benchmark-json=blocks.json --benchmark-save-data \\
        --benchmark-max-time=0.5 --benchmark-min-rounds=5 --benchmark-columns=min,median,mean,iqr,rounds

then ``harness.bench.pytest_benchmark.write_records("blocks.json", OUT_DIR)`` turns the JSON into benchmark
records (``kind: "kernel"``). ``--benchmark-save-data`` keeps every round's time, so the records get p90/p99
and samples. The CI smoke test (every benchmark once, as a test, well under a minute)::

    .venv/bin/python -m pytest benchmarks/test_blocks.py --benchmark-disable

Every benchmark is also a test: it checks its output against a float64 computation of the same math
(within a tolerance for the dtype) or checks shapes and contents.

Benchmarks (each for float32 and bfloat16; CPU; one intra-op thread unless ``GEMMA_BENCH_THREADS=N`` says
otherwise, recorded in extra_info ``threads``):

* ``test_attention``: the score/softmax/value step of one attention layer of gemma-3-1b (4 query heads,
  1 KV head, head_dim 256, scale 1/16), sliding (window 512) and full layers, HF's
  ``eager_attention_forward`` (Gemma 3) vs HF's ``sdpa_attention_forward`` vs the reference's
  ``ops.attention``, on the same q/k/v and the same explicit mask (bool for sdpa and the reference,
  additive finfo.min for eager, as HF builds them; HF itself drops the mask where it can, e.g. a full
  layer's decode, which these benchmarks do not). HF's eager and the reference run the same ops and are
  checked bit for bit equal. Shapes: ``decode`` = 1 query token at a context of
  640 (a full layer sees 640 keys; a sliding layer 512, what its cache keeps plus the new token) and
  ``prefill`` = 640 tokens at once (the sliding window masks the older keys). One group per
  (layer type, shape, dtype): eager, sdpa and reference side by side.
* ``test_rms_norm``: the reference ``RMSNorm`` built from the spec of gemma-3-1b (H=1152, ``1 + w``,
  rsqrt) and of gemma-4-26b-a4b (H=2816, ``w``, pow), on (1, 1, H) and (1, 640, H).
* ``test_rope``: ``ops.apply_rope`` on gemma-3-1b's queries (1, 4, T, 256) with the full layer's RoPE
  (theta 1e6), T = 1 and 640.
* ``test_moe``: the reference ``MoE`` (router, expert dispatch, norms and mix; not the dense MLP) of one
  gemma-4-26b-a4b layer: real hidden (2816), expert width (704) and top-k (8), but 16 experts instead of
  128 (the released layer's 761 M expert parameters, 3 GB in fp32, are too big for a quick benchmark):
  the name says so (``test_moe[16of128-...]``, the ``experts`` param) and so does extra_info
  (``experts``, ``experts_released``). 1 and 8 tokens.
* ``test_moe_dispatch``: the experts part alone (given one routing) of the same 16-of-128-expert
  gemma-4-26b-a4b layer under each CPU dispatch strategy of :mod:`harness.bench.moe_cost` (the layer and
  the routing built by it, seed 0): ``per_expert_loop`` (the reference's ``Experts.forward``),
  ``grouped_mm`` (torch's grouped matmul over the pairs sorted by expert), ``dense_all`` (every token
  through every expert, masked), and HF's ``Gemma4TextExperts`` under ``experts_implementation`` eager,
  grouped_mm and batched_mm (batched_mm at 1 token only: it copies every (token, expert) pair's weights,
  0.8-1.5 GB a call at 8 tokens). 1 and 8 tokens. Checked against ``experts_float64`` here, not
  moe_cost's own float64 reference. The whole layer at the released 128 experts and 1-4096 tokens, with
  the other parts and the roofline: ``python -m harness.bench.moe_cost``.
* ``test_kv_cache``: one decode step of ``LayerCache.extend`` + ``store`` on gemma-3-1b's layer cache
  (1 KV head, head_dim 256) at 639 cached tokens (a sliding layer holds its 511), sliding and full. The
  timed call also builds the ``LayerCache`` from the pre-filled tensors (a dataclass, ~1 µs), so every
  round starts from the same cache.
"""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch
import transformers
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

import configs
from harness.bench import moe_cost
from reference_impl import ops
from reference_impl.cache import LayerCache
from reference_impl.model import MoE, RMSNorm
from reference_impl.spec import GLOBAL, SLIDING, LayerSpec, ModelSpec, MoESpec

DENSE = "gemma-3-1b"
MOE = "gemma-4-26b-a4b"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Max |error| allowed, as a fraction of max |expected| (the float64 computation of the same math).
# Measured: float32 <= 1.3e-6, bfloat16 <= 6e-3 (attention, norms, RoPE, MoE at these shapes and seeds).
TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2}
CONTEXT = 640  # tokens: the decode context and the prefill length
MOE_EXPERTS = 16  # of the released 128 (MOE_RELEASED_EXPERTS)
LAYER_TYPES = {"sliding": SLIDING, "full": GLOBAL}
SEED = 0
# Intra-op threads. One by default: on a shared 2-core machine, two threads wait on each other at every
# parallel region whenever one is descheduled, and the times come out in multiples of the scheduler's slice.
THREADS = int(os.environ.get("GEMMA_BENCH_THREADS", "1"))

dtypes = pytest.mark.parametrize("dtype", list(DTYPES))
shapes = pytest.mark.parametrize("shape", ["decode", "prefill"])
layer_types = pytest.mark.parametrize("layer_type", list(LAYER_TYPES))


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@functools.cache
def spec(name: str) -> ModelSpec:
    return ModelSpec.from_hf_config(configs.hf_config(name))


MOE_RELEASED_EXPERTS = next(layer.moe for layer in spec(MOE).layers if layer.moe is not None).num_experts


def layer_of(name: str, layer_type: str) -> LayerSpec:
    return next(layer for layer in spec(name).layers if layer.attention == LAYER_TYPES[layer_type])


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = SEED, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def info(benchmark, **facts) -> None:
    benchmark.extra_info.update(device="cpu", threads=torch.get_num_threads(), torch=torch.__version__,
                                transformers=transformers.__version__, **facts)


def assert_close(out: torch.Tensor, expected: torch.Tensor, dtype: str, factor: float = 1.0) -> None:
    assert out.shape == expected.shape, (out.shape, expected.shape)
    assert out.dtype == DTYPES[dtype]
    assert torch.isfinite(out).all()
    err = (out.double() - expected.double()).abs().max().item()
    bound = factor * TOLERANCE[dtype] * expected.double().abs().max().item()
    assert err <= bound, f"max |error| {err:.3g} > {bound:.3g} ({dtype})"


# --- attention ---------------------------------------------------------------------------------------


class HFAttentionStub(torch.nn.Module):
    """What HF's attention functions read from their module (a Gemma3Attention, here without weights)."""

    def __init__(self, layer: LayerSpec):
        super().__init__()
        self.layer_idx = layer.index
        self.head_dim = layer.head_dim
        self.num_key_value_groups = layer.kv_groups
        self.scaling = layer.query_scale
        self.attention_dropout = 0.0
        self.is_causal = True
        self.sliding_window = layer.window
        self.eval()


@functools.cache
def attention_case(layer_type: str, shape: str, dtype: str):
    """q (1, N, T, D), k/v (1, K, S, D), the bool mask (1, 1, T, S) and the float64 expected output."""
    layer = layer_of(DENSE, layer_type)
    t = 1 if shape == "decode" else CONTEXT
    s = min(CONTEXT, layer.window) if shape == "decode" and layer.window else CONTEXT
    n, k, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = randn(1, n, t, d, dtype=DTYPES[dtype], seed=1)
    keys = randn(1, k, s, d, dtype=DTYPES[dtype], seed=2)
    values = randn(1, k, s, d, dtype=DTYPES[dtype], seed=3)
    # Decode: the query is the last of CONTEXT tokens and the keys the last s of them.
    key_slots = torch.arange(CONTEXT - s, CONTEXT)
    query_slots = key_slots[-t:]
    allowed = ops.attention_mask(query_slots, key_slots, torch.ones(1, s, dtype=torch.bool), layer.window)
    expected = ops.attention(q.double(), keys.double(), values.double(), allowed, layer.query_scale, None)
    return layer, q, keys, values, allowed, expected


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """HF's eager mask: 0 where allowed, finfo.min elsewhere, in the model dtype."""
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


@dtypes
@shapes
@layer_types
@pytest.mark.parametrize("impl", ["eager", "sdpa", "reference"])
def test_attention(benchmark, impl, layer_type, shape, dtype):
    layer, q, k, v, allowed, expected = attention_case(layer_type, shape, dtype)
    module = HFAttentionStub(layer)
    if impl == "eager":
        mask = additive(allowed, DTYPES[dtype])
        fn = lambda: eager_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=layer.query_scale)[0]
    elif impl == "sdpa":
        fn = lambda: sdpa_attention_forward(module, q, k, v, allowed, dropout=0.0, scaling=layer.query_scale)[0]
    else:  # the reference returns (B, N, T, D); HF's functions (B, T, N, D)
        fn = lambda: ops.attention(q, k, v, allowed, layer.query_scale, None).transpose(1, 2)
    benchmark.group = f"attention {DENSE} {layer_type} {shape} {dtype}"
    info(benchmark, block="attention", impl=impl, config=DENSE, layer_type=layer_type, layer_index=layer.index,
         shape=shape, dtype=dtype, q_shape=list(q.shape), kv_shape=list(k.shape), window=layer.window,
         scale=layer.query_scale, mask="explicit")
    with torch.inference_mode():
        out = benchmark(fn)
        if impl != "sdpa":  # the same ops in the same dtypes: HF's eager and the reference agree bit for bit
            mask = additive(allowed, DTYPES[dtype])
            other = (ops.attention(q, k, v, allowed, layer.query_scale, None).transpose(1, 2) if impl == "eager"
                     else eager_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=layer.query_scale)[0])
            assert torch.equal(out, other)
    assert_close(out, expected.transpose(1, 2), dtype)


# --- RMSNorm, RoPE ------------------------------------------------------------------------------------


@dtypes
@shapes
@pytest.mark.parametrize("config", [DENSE, MOE])
def test_rms_norm(benchmark, config, shape, dtype):
    model_spec = spec(config)
    h = model_spec.hidden_size
    norm = RMSNorm(h, model_spec)
    with torch.no_grad():
        norm.weight.copy_(randn(h, seed=4, scale=0.1) + (1 - model_spec.norm_offset))
    norm = norm.to(DTYPES[dtype])
    t = 1 if shape == "decode" else CONTEXT
    x = randn(1, t, h, dtype=DTYPES[dtype], seed=5, scale=3.0)
    benchmark.group = f"rms_norm {config} {shape} {dtype}"
    info(benchmark, block="rms_norm", impl="reference", config=config, shape=shape, dtype=dtype,
         x_shape=list(x.shape), offset=model_spec.norm_offset, pow=model_spec.norm_pow)
    with torch.inference_mode():
        out = benchmark(norm, x)
    xd = x.double()
    expected = xd / xd.pow(2).mean(-1, keepdim=True).add(model_spec.rms_norm_eps).sqrt()
    expected = expected * (model_spec.norm_offset + norm.weight.double())
    assert_close(out, expected, dtype)


@dtypes
@shapes
def test_rope(benchmark, shape, dtype):
    layer = layer_of(DENSE, "full")
    t = 1 if shape == "decode" else CONTEXT
    positions = torch.arange(CONTEXT - t, CONTEXT)[None]
    inv_freq = ops.rope_inv_freq(layer.head_dim, layer.rope.theta, layer.rope.linear_factor, layer.rope.rotary_fraction)
    cos, sin = ops.rope_cos_sin(positions, inv_freq, DTYPES[dtype])
    q = randn(1, layer.num_heads, t, layer.head_dim, dtype=DTYPES[dtype], seed=6)
    benchmark.group = f"rope {DENSE} {shape} {dtype}"
    info(benchmark, block="rope", impl="reference", config=DENSE, layer_type="full", shape=shape, dtype=dtype,
         x_shape=list(q.shape), theta=layer.rope.theta)
    with torch.inference_mode():
        out = benchmark(ops.apply_rope, q, cos, sin)
    assert_close(out, ops.apply_rope(q.double(), cos.double(), sin.double()), dtype)
    # A rotation: each (i, i + D/2) pair keeps its length (up to the rounding of cos/sin; squared
    # lengths, so twice the relative error).
    half = layer.head_dim // 2
    pair_norm = lambda x: x[..., :half].double().pow(2) + x[..., half:].double().pow(2)  # noqa: E731
    assert_close(pair_norm(out).to(DTYPES[dtype]), pair_norm(q), dtype, factor=2.0)


# --- MoE ----------------------------------------------------------------------------------------------


@functools.cache
def moe_case(dtype: str):
    model_spec = spec(MOE)
    released = next(layer.moe for layer in model_spec.layers if layer.moe is not None)
    moe_spec = MoESpec(num_experts=MOE_EXPERTS, top_k=released.top_k, intermediate_size=released.intermediate_size)
    moe = MoE(model_spec, moe_spec)
    h, i = model_spec.hidden_size, moe_spec.intermediate_size
    with torch.no_grad():
        for seed, (name, param) in enumerate(sorted(moe.named_parameters()), start=10):
            if name.startswith("experts."):
                param.copy_(randn(*param.shape, seed=seed, scale=param.shape[-1] ** -0.5))
            elif name == "router.proj.weight":
                param.copy_(randn(*param.shape, seed=seed, scale=h**-0.5))
            else:  # norm weights and router scales: near their neutral value
                neutral = 1 - model_spec.norm_offset if name.endswith("norm.weight") else 1.0
                param.copy_(randn(*param.shape, seed=seed, scale=0.1) + neutral)
    return model_spec, released, moe.to(DTYPES[dtype]).eval(), (h, i)


def experts_float64(moe: MoE, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, activation: str):
    """The experts' output token by token, in float64: sum_k w_k * down_e(gelu(gate_e x) * up_e x)."""
    gate_up, down = moe.experts.gate_up.double(), moe.experts.down.double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for n in range(x.shape[0]):
        for w, e in zip(weights[n].tolist(), experts[n].tolist(), strict=True):
            gate, up = (gate_up[e] @ x[n].double()).chunk(2)
            out[n] += w * (down[e] @ (ops.gelu(gate, activation) * up))
    return out


@dtypes
@pytest.mark.parametrize("tokens", [1, 8])
@pytest.mark.parametrize("experts", [f"{MOE_EXPERTS}of{MOE_RELEASED_EXPERTS}"])
def test_moe(benchmark, experts, tokens, dtype):
    model_spec, released, moe, (h, i) = moe_case(dtype)
    x = randn(1, tokens, h, dtype=DTYPES[dtype], seed=7)
    mlp_out = randn(1, tokens, h, dtype=DTYPES[dtype], seed=8)
    benchmark.group = f"moe {MOE} {tokens} tokens {dtype}"
    info(benchmark, block="moe", impl="reference", config=MOE, dtype=dtype, tokens=tokens, hidden=h,
         expert_intermediate=i, top_k=released.top_k, experts=MOE_EXPERTS, experts_released=released.num_experts)
    with torch.inference_mode():
        out = benchmark(moe, x, mlp_out, None, "layers.0")
        _, weights, chosen = moe.router(x.reshape(-1, h))
        normed = moe.input_norm(x).reshape(-1, h)
        y = experts_float64(moe, normed, weights, chosen, model_spec.activation).reshape(1, tokens, h)
        # mix() normalises the experts' output, which would hide a scale error: check it before, too.
        assert_close(moe.experts(normed, weights, chosen).reshape(1, tokens, h), y, dtype)
        expected = moe.mix(mlp_out, y.to(DTYPES[dtype]))
    assert_close(out, expected, dtype)
    assert chosen.shape == (tokens, released.top_k) and int(chosen.max()) < MOE_EXPERTS


# --- MoE dispatch strategies ----------------------------------------------------------------------


DISPATCH_STRATEGIES = ["per_expert_loop", "grouped_mm", "dense_all", "hf_eager", "hf_grouped_mm", "hf_batched_mm"]
DISPATCH_CASES = [(s, n) for n in (1, 8) for s in DISPATCH_STRATEGIES if s != "hf_batched_mm" or n == 1]


@functools.cache
def dispatch_layer(dtype: str) -> moe_cost.Layer:
    """moe_cost's layer of gemma-4-26b-a4b with 16 of its 128 experts, the reference's and HF's modules
    sharing one set of random weights."""
    config = moe_cost.model_config(MOE, MOE_EXPERTS)
    return moe_cost.build_layer(ModelSpec.from_hf_config(config), 0, DTYPES[dtype], "cpu", SEED, config)


@functools.cache
def dispatch_group(dtype: str, tokens: int) -> moe_cost.Group:
    """The experts' normed input (N, H) and the router's own routing of N random tokens."""
    with torch.inference_mode():
        return moe_cost.make_group([dispatch_layer(dtype)], tokens, dtype, "uniform", moe_cost.Options(out=None))


@functools.cache
def dispatch_expected(dtype: str, tokens: int) -> torch.Tensor:
    """The experts' output in float64 (N, H), once per case: every strategy is checked against it."""
    layer, group = dispatch_layer(dtype), dispatch_group(dtype, tokens)
    routing = group.routings[0]
    with torch.inference_mode():
        return experts_float64(layer.moe, group.normed[0], routing.weights, routing.experts, layer.spec.activation)


@dtypes
@pytest.mark.parametrize(("strategy", "tokens"), DISPATCH_CASES)
@pytest.mark.parametrize("experts", [f"{MOE_EXPERTS}of{MOE_RELEASED_EXPERTS}"])
def test_moe_dispatch(benchmark, experts, strategy, tokens, dtype):
    layer, group = dispatch_layer(dtype), dispatch_group(dtype, tokens)
    x, routing = group.normed[0], group.routings[0]
    fn, kernel = moe_cost.experts_fn(strategy, layer, x, routing, moe_cost.Options(out=None), None, dtype)
    benchmark.group = f"moe dispatch {MOE} {tokens} tokens {dtype}"
    info(benchmark, block="moe_dispatch", impl=strategy, kernel=kernel, config=MOE, dtype=dtype, tokens=tokens,
         hidden=layer.spec.hidden_size, expert_intermediate=layer.moe_spec.intermediate_size,
         top_k=layer.moe_spec.top_k, experts=MOE_EXPERTS, experts_released=MOE_RELEASED_EXPERTS)
    with torch.inference_mode():
        out = benchmark(fn)
    assert_close(out, dispatch_expected(dtype, tokens), dtype)
    assert routing.experts.shape == (tokens, layer.moe_spec.top_k) and int(routing.experts.max()) < MOE_EXPERTS


# --- KV cache -----------------------------------------------------------------------------------------


@dtypes
@layer_types
def test_kv_cache(benchmark, layer_type, dtype):
    layer = layer_of(DENSE, layer_type)
    held = CONTEXT - 1 if layer.window is None else min(CONTEXT - 1, layer.window - 1)
    shape = (1, layer.num_kv_heads, held, layer.head_dim)
    keys, values = randn(*shape, dtype=DTYPES[dtype], seed=9), randn(*shape, dtype=DTYPES[dtype], seed=10)
    slots = torch.arange(CONTEXT - 1 - held, CONTEXT - 1)
    valid = torch.ones(1, held, dtype=torch.bool)
    new_k = randn(1, layer.num_kv_heads, 1, layer.head_dim, dtype=DTYPES[dtype], seed=11)
    new_v = randn(1, layer.num_kv_heads, 1, layer.head_dim, dtype=DTYPES[dtype], seed=12)
    new_slot, new_valid = torch.tensor([CONTEXT - 1]), torch.ones(1, 1, dtype=torch.bool)

    def step() -> tuple[LayerCache, torch.Tensor]:
        cache = LayerCache(window=layer.window, keys=keys, values=values, slots=slots, valid=valid)
        k, v, key_slots, key_valid = cache.extend(new_k, new_v, new_slot, new_valid)
        cache.store(k, v, key_slots, key_valid)
        return cache, k

    benchmark.group = f"kv_cache {DENSE} {dtype}"
    info(benchmark, block="kv_cache", impl="reference", config=DENSE, layer_type=layer_type, dtype=dtype,
         cached=held, context=CONTEXT, kv_shape=list(shape), window=layer.window)
    cache, attended = benchmark(step)
    assert attended.shape[2] == held + 1  # the query sees the cache plus itself
    expected_len = held + 1 if layer.window is None else layer.window - 1
    assert cache.length == expected_len and cache.keys.shape[2] == expected_len
    assert cache.slots[-1].item() == CONTEXT - 1 and bool(cache.valid.all())
    assert torch.equal(cache.keys[:, :, -1:], new_k) and torch.equal(cache.values[:, :, -1:], new_v)
    assert torch.equal(cache.keys[:, :, -2], keys[:, :, -1])
    assert math.prod(cache.values.shape) == math.prod(cache.keys.shape)
