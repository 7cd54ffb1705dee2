"""Hand-computed checks of the numerical building blocks in ``reference_impl.ops``.

Expectations come from arithmetic on tiny explicit tensors or from the textbook formula evaluated
independently (``math`` in float64), never from the implementation itself.
"""

from __future__ import annotations

import math

import pytest
import torch

from reference_impl import ops

# ---------------------------------------------------------------------------------------------------
# rms_norm


def test_rms_norm_hand_values_offset_one():
    # x = [3, 4]: mean(x^2) = 12.5, so x_hat = [3, 4] / sqrt(12.5) = [3, 4] * sqrt(2) / 5.
    # (1 + w) = [1, 2]  ->  [3 sqrt2 / 5, 8 sqrt2 / 5].
    x = torch.tensor([3.0, 4.0])
    w = torch.tensor([0.0, 1.0])
    y = ops.rms_norm(x, w, eps=0.0, offset=1.0)
    expected = torch.tensor([3 * math.sqrt(2) / 5, 8 * math.sqrt(2) / 5])
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=0)


def test_rms_norm_offset_zero_and_eps():
    # offset 0 multiplies by w itself: [0, 1] keeps only the second element.
    x = torch.tensor([3.0, 4.0])
    y = ops.rms_norm(x, torch.tensor([0.0, 1.0]), eps=0.0, offset=0.0)
    torch.testing.assert_close(y, torch.tensor([0.0, 4 * math.sqrt(2) / 5]), rtol=1e-6, atol=0)
    # eps is added inside the sqrt: x = [1, 1], eps = 3 -> 1 / sqrt(1 + 3) = 0.5.
    y = ops.rms_norm(torch.tensor([1.0, 1.0]), torch.zeros(2), eps=3.0, offset=1.0)
    torch.testing.assert_close(y, torch.tensor([0.5, 0.5]), rtol=1e-7, atol=0)


def test_rms_norm_normalises_last_dim_only():
    x = torch.tensor([[3.0, 4.0], [6.0, 8.0], [1.0, 0.0]])
    y = ops.rms_norm(x, torch.zeros(2), eps=0.0, offset=1.0)
    s = math.sqrt(2) / 5
    expected = torch.tensor([[3 * s, 4 * s], [3 * s, 4 * s], [math.sqrt(2), 0.0]])
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=0)


def test_rms_norm_bf16_hand_case_rounds_once():
    # bf16 x = [3, 4], w = [0, 1], eps = 0.
    # fp32 route: 3 sqrt2 / 5 = 0.848528 -> bf16 (spacing 2^-8 in [0.5, 1)) = 217 * 2^-8 = 0.84765625;
    #             8 sqrt2 / 5 = 2.262742 -> bf16 (spacing 2^-6 in [2, 4)) = 145 * 2^-6 = 2.265625.
    # bf16 route: rsqrt(12.5) = 0.282843 -> bf16 0.283203125; 3 * that = 0.849609375 = 217.5 * 2^-8,
    #             a tie that rounds to even: 218 * 2^-8 = 0.8515625.
    x = torch.tensor([3.0, 4.0], dtype=torch.bfloat16)
    w = torch.tensor([0.0, 1.0], dtype=torch.bfloat16)
    y = ops.rms_norm(x, w, eps=0.0, offset=1.0)
    assert y.dtype == torch.bfloat16
    assert y.tolist() == [0.84765625, 2.265625]
    in_bf16 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) * (1.0 + w)
    assert in_bf16.tolist() == [0.8515625, 2.265625]


def _rms_norm_hf_recipe(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Gemma RMSNorm as written in the numerics notes (§1.2 row 12)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = y * (1.0 + w.float())
    return y.type_as(x)


def test_rms_norm_bf16_computes_in_fp32_and_casts_once():
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 64, generator=gen) * 3).bfloat16()
    w = (torch.randn(64, generator=gen) * 0.3).bfloat16()
    eps = 1e-6
    y = ops.rms_norm(x, w, eps=eps, offset=1.0)
    assert y.dtype == torch.bfloat16
    expected = _rms_norm_hf_recipe(x, w, eps)
    assert torch.equal(y, expected)

    # Two wrong recipes that must give something else on this input:
    # (a) everything in bf16;
    in_bf16 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w)
    # (b) Llama-style: cast the normalised x to bf16, then multiply by the weight in bf16.
    llama = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).bfloat16() * (1.0 + w)
    for wrong in (in_bf16, llama):
        assert not torch.equal(wrong, expected), "test input does not separate the recipes"
        assert not torch.equal(y, wrong)


def test_rms_norm_keeps_input_dtype_for_fp32_weight():
    # Weight stored in fp32 and input in bf16: the output is cast back to the input's dtype.
    y = ops.rms_norm(torch.tensor([3.0, 4.0], dtype=torch.bfloat16), torch.tensor([0.0, 1.0]), 0.0, 1.0)
    assert y.dtype == torch.bfloat16
    assert y.tolist() == [torch.tensor(3 * math.sqrt(2) / 5).bfloat16().item(), torch.tensor(8 * math.sqrt(2) / 5).bfloat16().item()]


# ---------------------------------------------------------------------------------------------------
# gelu

XS = [-4.0, -2.5, -1.0, -0.5, -0.1, 0.0, 0.1, 0.5, 1.0, 1.7, 3.0, 6.0]


def _gelu_exact(x: float) -> float:
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


def _gelu_tanh(x: float) -> float:
    return 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("kind, formula", [("gelu", _gelu_exact), ("gelu_tanh", _gelu_tanh)])
def test_gelu_matches_formula(kind, formula):
    x = torch.tensor(XS, dtype=torch.float64)
    y = ops.gelu(x, kind)
    expected = torch.tensor([formula(v) for v in XS], dtype=torch.float64)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-14)


def test_gelu_tanh_and_exact_differ():
    x = torch.tensor(XS, dtype=torch.float64)
    diff = (ops.gelu(x, "gelu_tanh") - ops.gelu(x, "gelu")).abs()
    # The two forms differ by ~1.5e-4 at x = 1 (0.841192 vs 0.841345) and agree at 0.
    assert diff.max().item() > 1e-4
    assert diff[XS.index(0.0)].item() == 0.0
    assert abs(ops.gelu(torch.tensor([1.0], dtype=torch.float64), "gelu").item() - 0.8413447460685429) < 1e-12


# ---------------------------------------------------------------------------------------------------
# softcap


def test_softcap_saturates_at_cap():
    x = torch.tensor([-1e6, -500.0, 500.0, 1e6])
    y = ops.softcap(x, 50.0)
    torch.testing.assert_close(y, torch.tensor([-50.0, -50.0, 50.0, 50.0]), rtol=0, atol=1e-4)
    assert bool((y.abs() <= 50.0).all())


def test_softcap_small_values_nearly_identity_and_formula():
    x = torch.tensor([-0.3, -0.01, 0.0, 0.01, 0.3, 20.0, 45.0], dtype=torch.float64)
    cap = 50.0
    y = ops.softcap(x, cap)
    expected = torch.tensor([cap * math.tanh(v / cap) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=0)
    # |x| << cap: tanh(x/c)*c = x - x^3/(3 c^2) + ..., i.e. identity up to ~x^3/7500.
    small = x[:5]
    assert (ops.softcap(small, cap) - small).abs().max().item() < 0.3**3 / (3 * cap**2) * 1.01
    # 45 is visibly capped: 50 tanh(0.9) = 50 * 0.716298 = 35.8149.
    assert abs(y[-1].item() - 35.8149) < 1e-3


def test_softcap_none_is_identity():
    x = torch.randn(5)
    assert ops.softcap(x, None) is x


# ---------------------------------------------------------------------------------------------------
# RoPE


def test_rope_inv_freq_hand_values():
    inv = ops.rope_inv_freq(4, 10000.0)
    assert inv.dtype == torch.float32
    torch.testing.assert_close(inv, torch.tensor([1.0, 0.01]), rtol=1e-6, atol=0)
    torch.testing.assert_close(ops.rope_inv_freq(8, 10000.0), torch.tensor([1.0, 0.1, 0.01, 0.001]), rtol=1e-6, atol=0)
    torch.testing.assert_close(ops.rope_inv_freq(4, 10000.0, 8.0), torch.tensor([0.125, 0.00125]), rtol=1e-6, atol=0)
    torch.testing.assert_close(ops.rope_inv_freq(4, 1e6), torch.tensor([1.0, 0.001]), rtol=1e-6, atol=0)


def test_rope_cos_sin_values_and_dtype():
    inv = torch.tensor([1.0, 0.01])
    pos = torch.tensor([[0, 1, 2]])
    cos, sin = ops.rope_cos_sin(pos, inv, torch.float32)
    assert cos.shape == (1, 3, 4)
    angles = [[p * f for f in (1.0, 0.01, 1.0, 0.01)] for p in (0, 1, 2)]
    torch.testing.assert_close(cos[0], torch.tensor([[math.cos(a) for a in row] for row in angles]), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[0], torch.tensor([[math.sin(a) for a in row] for row in angles]), rtol=0, atol=1e-6)
    # Computed in fp32 and then rounded: the bf16 table is the rounding of the fp32 one.
    big = torch.tensor([[1000, 4097]])
    c16, s16 = ops.rope_cos_sin(big, inv, torch.bfloat16)
    c32, s32 = ops.rope_cos_sin(big, inv, torch.float32)
    assert c16.dtype == torch.bfloat16
    assert torch.equal(c16, c32.bfloat16()) and torch.equal(s16, s32.bfloat16())
    # The angle itself is fp32: position 4097 is not representable in bf16 (it would become 4096).
    assert abs(c32[0, 1, 0].item() - math.cos(4097)) < 1e-4
    assert abs(math.cos(4097) - math.cos(4096)) > 0.1


def _table(angles: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (1, 1, D) for half-split RoPE with per-pair angles (D = 2 * len(angles))."""
    full = angles + angles
    cos = torch.tensor([[[math.cos(a) for a in full]]], dtype=torch.float64)
    sin = torch.tensor([[[math.sin(a) for a in full]]], dtype=torch.float64)
    return cos, sin


def test_apply_rope_position_zero_is_identity():
    x = torch.randn(2, 3, 5, 8)
    cos, sin = ops.rope_cos_sin(torch.zeros(2, 5, dtype=torch.long), ops.rope_inv_freq(8, 10000.0), torch.float32)
    assert torch.equal(ops.apply_rope(x, cos, sin), x)


def test_apply_rope_half_split_90_degrees():
    # D = 4: pairs are (x0, x2) and (x1, x3) (half-split), not (x0, x1), (x2, x3) (interleaved).
    # Rotate pair 0 by 90 degrees, pair 1 by 0: (1, 3) -> (-3, 1), (2, 4) unchanged.
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 1, 1, 4)
    cos, sin = _table([math.pi / 2, 0.0])
    y = ops.apply_rope(x, cos, sin).flatten()
    torch.testing.assert_close(y, torch.tensor([-3.0, 2.0, 1.0, 4.0], dtype=torch.float64), rtol=0, atol=1e-12)
    # Pair 1 by 90 degrees instead: (2, 4) -> (-4, 2).
    cos, sin = _table([0.0, math.pi / 2])
    y = ops.apply_rope(x, cos, sin).flatten()
    torch.testing.assert_close(y, torch.tensor([1.0, -4.0, 3.0, 2.0], dtype=torch.float64), rtol=0, atol=1e-12)


def test_apply_rope_general_angle_against_rotation_matrix():
    a, b = 0.7, -1.9
    x = torch.tensor([0.3, -1.2, 2.0, 0.5], dtype=torch.float64).view(1, 1, 1, 4)
    cos, sin = _table([a, b])
    y = ops.apply_rope(x, cos, sin).flatten().tolist()
    x0, x1, x2, x3 = 0.3, -1.2, 2.0, 0.5
    expected = [
        x0 * math.cos(a) - x2 * math.sin(a),
        x1 * math.cos(b) - x3 * math.sin(b),
        x2 * math.cos(a) + x0 * math.sin(a),
        x3 * math.cos(b) + x1 * math.sin(b),
    ]
    assert y == pytest.approx(expected, abs=1e-12)


def test_apply_rope_scores_depend_only_on_relative_position():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, 1, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, generator=gen, dtype=torch.float64)
    inv = ops.rope_inv_freq(16, 10000.0)

    def score(m: int, n: int) -> float:
        cq, sq = ops.rope_cos_sin(torch.tensor([[m]]), inv, torch.float64)
        ck, sk = ops.rope_cos_sin(torch.tensor([[n]]), inv, torch.float64)
        return (ops.apply_rope(q, cq, sq) * ops.apply_rope(k, ck, sk)).sum().item()

    assert score(7, 3) == pytest.approx(score(4, 0), abs=1e-5)
    assert score(12, 10) == pytest.approx(score(2, 0), abs=1e-5)
    assert abs(score(7, 3) - score(7, 2)) > 1e-3


# ---------------------------------------------------------------------------------------------------
# repeat_kv


def test_repeat_kv_query_head_reads_kv_head_h_div_groups():
    x = torch.tensor([10.0, 20.0]).view(1, 2, 1, 1)  # two kv heads
    y = ops.repeat_kv(x, 3)
    assert y.shape == (1, 6, 1, 1)
    assert y.flatten().tolist() == [10.0, 10.0, 10.0, 20.0, 20.0, 20.0]  # h // 3, not h % 2


def test_repeat_kv_keeps_positions_and_groups_one():
    x = torch.arange(2 * 3 * 2, dtype=torch.float32).view(1, 2, 3, 2) + torch.tensor([0.0, 100.0]).view(1, 2, 1, 1)
    y = ops.repeat_kv(x, 2)
    for h in range(4):
        assert torch.equal(y[0, h], x[0, h // 2])
    assert ops.repeat_kv(x, 1) is x


# ---------------------------------------------------------------------------------------------------
# attention_mask


@pytest.mark.parametrize("window", [1, 3, 4, None])
def test_attention_mask_window_and_causal(window):
    n = 10
    slots = torch.arange(n)
    valid = torch.ones(1, n, dtype=torch.bool)
    m = ops.attention_mask(slots, slots, valid, window)
    assert m.shape == (1, 1, n, n) and m.dtype == torch.bool
    for q in range(n):
        seen = [k for k in range(n) if m[0, 0, q, k]]
        lo = 0 if window is None else max(0, q - window + 1)
        assert seen == list(range(lo, q + 1))
        if window is not None and q >= window - 1:
            assert len(seen) == window  # exactly W keys, the query itself included
        if window is not None and q >= window:
            assert not m[0, 0, q, q - window]  # distance W is masked


def test_attention_mask_padding_keys_masked_per_row():
    slots = torch.arange(6)
    valid = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    m = ops.attention_mask(slots, slots, valid, 3)
    assert m.shape == (2, 1, 6, 6)
    # Row 1, query 4: window {2, 3, 4}, all real.  Query 3: window {1, 2, 3}, slot 1 is padding.
    assert m[1, 0, 4].tolist() == [False, False, True, True, True, False]
    assert m[1, 0, 3].tolist() == [False, False, True, True, False, False]
    assert m[0, 0, 3].tolist() == [False, True, True, True, False, False]
    assert not bool(m[1, 0, :, :2].any())


def test_attention_mask_with_offset_query_slots():
    # Decode step: one query at slot 9 against cached keys at slots 6..9 with window 4.
    m = ops.attention_mask(torch.tensor([9]), torch.tensor([5, 6, 7, 8, 9]), torch.ones(1, 5, dtype=torch.bool), 4)
    assert m[0, 0, 0].tolist() == [False, True, True, True, True]


# ---------------------------------------------------------------------------------------------------
# attention


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_attention_one_head_against_hand_softmax():
    q = [[1.0, 0.0], [0.5, -1.0], [2.0, 1.0]]  # T = 3, D = 2
    k = [[1.0, 2.0], [0.0, 1.0], [-1.0, 1.0]]
    v = [[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]
    scale = 0.5
    qt, kt, vt = (torch.tensor(a, dtype=torch.float64).view(1, 1, 3, 2) for a in (q, k, v))
    allowed = ops.attention_mask(torch.arange(3), torch.arange(3), torch.ones(1, 3, dtype=torch.bool), None)
    out = ops.attention(qt, kt, vt, allowed, scale, None)[0, 0]
    for t in range(3):
        scores = [scale * sum(a * b for a, b in zip(q[t], k[s], strict=True)) for s in range(t + 1)]
        p = _softmax(scores)
        expected = [sum(p[s] * v[s][d] for s in range(t + 1)) for d in range(2)]
        assert out[t].tolist() == pytest.approx(expected, abs=1e-12)
    # Query 0 sees only key 0: output is exactly v[0].
    assert out[0].tolist() == pytest.approx(v[0], abs=1e-12)


def test_attention_softcap_before_mask():
    # One query, three keys; key 2 is masked. cap = 1 so capping matters and a mask applied before
    # the cap would turn finfo.min into -1 and leak weight onto the masked key.
    q = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 1, 1, 2)
    k = torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.5, 0.0]], dtype=torch.float64).view(1, 1, 3, 2)
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [100.0, 100.0]], dtype=torch.float64).view(1, 1, 3, 2)
    allowed = torch.tensor([True, True, False]).view(1, 1, 1, 3)
    cap = 1.0
    out = ops.attention(q, k, v, allowed, 1.0, cap).flatten().tolist()
    s = [cap * math.tanh(3.0 / cap), cap * math.tanh(0.0 / cap)]
    p = _softmax(s)
    assert out == pytest.approx([p[0], p[1]], abs=1e-12)
    # Not the uncapped softmax (scores 3, 0) ...
    p_uncapped = _softmax([3.0, 0.0])
    assert abs(out[0] - p_uncapped[0]) > 0.1
    # ... and not mask-then-cap (masked score becomes -1).
    p_leak = _softmax([math.tanh(3.0), 0.0, -1.0])
    assert abs(out[0] - (p_leak[0] + 100 * p_leak[2])) > 1.0


def test_attention_gqa_and_scale():
    # Two query heads sharing one kv head: each head's output uses the same k/v.
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 2, 3, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, 2, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 1, 2, 3, generator=gen, dtype=torch.float64)
    allowed = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    scale = 0.25
    out = ops.attention(q, k, v, allowed, scale, None)
    for h in range(2):
        for t in range(2):
            scores = [scale * float(q[0, h, t] @ k[0, 0, s]) for s in range(2)]
            p = _softmax(scores)
            expected = [sum(p[s] * float(v[0, 0, s, d]) for s in range(2)) for d in range(3)]
            assert out[0, h, t].tolist() == pytest.approx(expected, abs=1e-12)


def test_attention_bf16_softmax_in_fp32():
    # bf16 inputs: probabilities are an fp32 softmax rounded to bf16, then p @ v in bf16.
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 1, 4, 8, generator=gen).bfloat16()
    k = torch.randn(1, 1, 4, 8, generator=gen).bfloat16()
    v = torch.randn(1, 1, 4, 8, generator=gen).bfloat16()
    allowed = ops.attention_mask(torch.arange(4), torch.arange(4), torch.ones(1, 4, dtype=torch.bool), None)
    out = ops.attention(q, k, v, allowed, 0.5, 5.0)
    assert out.dtype == torch.bfloat16
    scores = torch.tanh((q @ k.transpose(2, 3)) * 0.5 / 5.0) * 5.0  # in bf16, three rounded ops
    scores = scores.masked_fill(~allowed, torch.finfo(torch.bfloat16).min)
    probs = torch.softmax(scores.float(), dim=-1).bfloat16()
    assert torch.equal(out, probs @ v)
