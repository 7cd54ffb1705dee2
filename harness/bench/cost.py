"""The work a generation cell does, from the reference's spec and module tree: weight bytes a decode
step reads, FLOPs a prefill computes. The roofline columns divide measured speed by these."""

from __future__ import annotations

import torch

from reference_impl.model import Gemma
from reference_impl.spec import ModelSpec

from ..kvcache import kv_bytes_read

# Tables read one row per token, not whole: their bytes are not read by a decode step.
_LOOKUP_TABLES = ("ple.table.weight",)


def _parameters(spec: ModelSpec) -> dict[str, torch.Size]:
    return {name: p.shape for name, p in Gemma(spec, device="meta").named_parameters()}


def model_facts(spec: ModelSpec) -> dict:
    """Parameter counts: ``params`` (all), ``step_params`` (what one token's forward multiplies by:
    matrices, the LM head, the active share of MoE experts), ``dense_params`` (the matrices every token
    reads, lookup tables excluded) and ``expert_params`` (all MoE experts' matrices)."""
    shapes = _parameters(spec)
    total = sum(s.numel() for s in shapes.values())
    step = dense = experts = 0.0
    tied = "lm_head.weight" not in shapes
    for name, shape in shapes.items():
        n = shape.numel()
        if len(shape) < 2 or name in _LOOKUP_TABLES:
            continue  # norms and scales: negligible; lookup tables: one row per token
        if name == "embed.weight" and not tied:
            continue  # the input lookup; the untied head is counted as lm_head.weight
        if ".moe.experts." in name:
            moe = spec.layers[int(name.split(".")[1])].moe
            step += n * moe.top_k / moe.num_experts
            experts += n
        else:
            step += n
            dense += n
    return {"params": total, "step_params": step, "dense_params": dense, "expert_params": experts}


def expert_share(spec: ModelSpec, batch: int) -> float:
    """Expected fraction of a layer's experts a decode step of ``batch`` tokens reads, routing taken as
    uniform and independent: 1 - (1 - k/E)^B (k/E for one token)."""
    moe = next((layer.moe for layer in spec.layers if layer.moe is not None), None)
    return 0.0 if moe is None else 1 - (1 - moe.top_k / moe.num_experts) ** batch


def prefill_flops(spec: ModelSpec, facts: dict, batch: int, prompt: int) -> float:
    """Matmul FLOPs of a prefill that computes logits for the last token only (as HF's generate does):
    2 x (layer matrices) x tokens, plus attention's two products over the causal (windowed) keys, plus
    the LM head for one token per sequence."""
    head = spec.vocab_size * spec.hidden_size
    flops = 2.0 * (facts["step_params"] - head) * batch * prompt + 2.0 * head * batch
    for layer in spec.layers:
        w = layer.window or prompt
        keys = sum(min(t + 1, w) for t in range(prompt))  # keys seen by each query, summed
        flops += 2 * 2 * batch * layer.num_heads * layer.head_dim * keys
    return flops


def decode_bytes_per_step(spec: ModelSpec, facts: dict, batch: int, prompt: int, gen: int,
                          dtype_bytes: float) -> float:
    """Bytes one decode step reads on average over the generation: the weights once (batched rows share
    them; of MoE experts the share the batch's tokens route to) and the K/V each layer attends to at the
    step's context length."""
    steps = range(prompt + 1, prompt + gen)  # contexts of steps 2..G (the first token comes from prefill)
    kv = sum(kv_bytes_read(spec, c, batch, dtype_bytes) for c in steps) / max(1, len(steps))
    weights = facts["dense_params"] + facts["expert_params"] * expert_share(spec, batch)
    return weights * dtype_bytes + kv
