"""Measured KV-cache bytes per implementation, beside the analytic figure of :mod:`harness.kvcache`.

Each implementation prefills ``context`` tokens through its own cache, the way its generation does
(the reference's :class:`~reference_impl.cache.KVCache`; HF's ``DynamicCache`` built from the config,
as ``generate`` builds it, fed in chunks; vLLM's engine, whose block pool is read; llama.cpp's context
for the real 270M GGUF), and the bytes each layer's cache really holds are read back per layer.

The model is the released config's **KV twin**: every layer's KV geometry is kept (layer types and
windows, KV heads, head dims, K=V, KV sharing, the maximum context) and what never enters a cache is
shrunk (hidden size, MLP and expert sizes, vocabulary, query heads down to the KV heads), so a 32K
prefill costs attention only. A model too deep to run whole is cut to its first layers (every layer
type kept), and the measured bytes of each layer type are scaled to the released layer count: the
result says so.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable

import torch

import configs
from reference_impl.spec import ModelSpec

from .kvcache import DTYPE_BYTES, layer_type, tokens_held

TWIN_HIDDEN = 64  # small dims that keep every config constraint (multiples of 8 and 32)
TWIN_INTERMEDIATE = 64
TWIN_VOCAB = 1024
TWIN_EXPERTS = 8
_SHRUNK = {"hidden_size": TWIN_HIDDEN, "intermediate_size": TWIN_INTERMEDIATE, "vocab_size": TWIN_VOCAB,
           "moe_intermediate_size": 16, "vocab_size_per_layer_input": TWIN_VOCAB, "hidden_size_per_layer_input": 16}


def kv_twin(config: dict, layers: int | None = None) -> dict:
    """The config with its KV geometry kept and everything else shrunk (see the module docstring)."""
    twin = configs.cut(config, layers) if layers else dict(config)
    for key, value in _SHRUNK.items():
        if twin.get(key):
            twin[key] = value
    twin["num_attention_heads"] = twin["num_key_value_heads"]
    if twin.get("num_experts"):
        twin["num_experts"] = TWIN_EXPERTS
        for key in ("top_k_experts", "num_experts_per_tok"):
            if twin.get(key):
                twin[key] = min(twin[key], TWIN_EXPERTS // 2)
    return twin


def cut_for(config: dict, limit: int = 6) -> int | None:
    """The fewest first layers (at least ``limit``, the usual 5:1 period) whose cut holds every layer
    type the model has (a KV-shared model's cut keeps part of its shared tail, reading the same donors),
    or None when only the whole model does."""
    wanted = {layer_type(layer) for layer in ModelSpec.from_hf_config(config).layers}
    total = config["num_hidden_layers"]
    for n in range(min(limit, total), total):
        if {layer_type(layer) for layer in ModelSpec.from_hf_config(configs.cut(config, n)).layers} == wanted:
            return n
    return None


def scaled_total(per_layer: list[int], cut: ModelSpec, full: ModelSpec) -> int:
    """The full model's bytes from a cut's per-layer bytes: each layer type's measured bytes per layer
    times the number of such layers in the full model."""
    by_type: dict[str, list[int]] = {}
    for layer, size in zip(cut.layers, per_layer, strict=True):
        by_type.setdefault(layer_type(layer), []).append(size)
    counts = Counter(layer_type(layer) for layer in full.layers)
    missing = sorted(set(counts) - set(by_type))
    if missing:
        raise ValueError(f"the cut holds no layer of type {missing[0]!r}: it cannot be scaled")
    return sum(round(sum(by_type[t]) / len(by_type[t]) * n) for t, n in counts.items())


# --- implementations -----------------------------------------------------------------------------------


def _random_model_inputs(twin: dict, context: int, seed: int = 0):
    from .synthetic import random_state_dict

    spec = ModelSpec.from_hf_config(twin)
    state = random_state_dict(spec, seed=seed)
    ids = torch.randint(3, spec.vocab_size, (1, context), generator=torch.Generator().manual_seed(seed))
    return spec, state, ids


def _chunks(total: int, chunk: int):
    for start in range(0, total, chunk):
        yield start, min(total, start + chunk)


@torch.no_grad()
def measure_reference(twin: dict, context: int, dtype: torch.dtype, chunk: int = 1024) -> list[int]:
    """Bytes of K/V each layer of the reference's cache holds after a ``context``-token prefill."""
    from reference_impl.cache import KVCache
    from reference_impl.weights import build

    spec, state, ids = _random_model_inputs(twin, context)
    model = build(spec, state, dtype)
    cache = KVCache.for_model(spec)
    for start, end in _chunks(context, chunk):
        model(ids[:, start:end], cache=cache, with_logits=False)
    return [sum(t.nbytes for t in (layer.keys, layer.values) if t is not None) for layer in cache.layers]


@torch.no_grad()
def measure_hf(twin: dict, context: int, dtype: torch.dtype, chunk: int = 1024, attn: str = "sdpa") -> list[int]:
    """Bytes of K/V each layer of HF's cache holds after a ``context``-token prefill: the cache
    ``generate`` builds by default (``DynamicCache(config=...)``), fed ``chunk`` tokens per forward."""
    from transformers import DynamicCache

    from .adapters.base import Unsupported
    from .adapters.hf import hf_adapter

    _, state, ids = _random_model_inputs(twin, context)
    adapter = hf_adapter(attn=attn)
    try:
        adapter.load(twin, state, dtype)
    except Unsupported:  # Gemma 2 has eager attention only; the cache is the same either way
        adapter = hf_adapter(attn="eager")
        adapter.load(twin, state, dtype)
    model = adapter.model
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    for start, end in _chunks(context, chunk):
        model(input_ids=ids[:, start:end], past_key_values=cache, use_cache=True, logits_to_keep=1)
    out = []
    for layer in cache.layers:
        tensors = (getattr(layer, "keys", None), getattr(layer, "values", None))
        out.append(sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor)))
    n_layers = len(ModelSpec.from_hf_config(twin).layers)
    return out + [0] * (n_layers - len(out))  # layers HF's cache has no entry for hold nothing


def _vllm_layer_index(name: str) -> int:
    """``model.layers.12.self_attn.attn`` -> 12."""
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])


@torch.no_grad()
def measure_vllm_here(twin: dict, context: int, dtype: torch.dtype, chunk: int = 2048, hybrid: bool = True) -> dict:
    """In vLLM's interpreter: prefill ``context`` tokens, generate two, and read the block pool while the
    request is alive. Per layer: the blocks the request holds in that layer's KV-cache group times the
    group's page size; also the spec of every group and the pool vLLM allocated."""
    import os
    import shutil
    import tempfile

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    # a context at the model's maximum plus the tokens generated after it passes the maximum by a few
    # positions; the cache's layout does not depend on it
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from .model_dir import write_model_dir

    spec, state, ids = _random_model_inputs(twin, context)
    folder = tempfile.mkdtemp(prefix="gemma-kv-vllm-")
    try:
        write_model_dir(folder, twin, state, dtype)
        llm = LLM(model=folder, dtype=_dtype_name(dtype), enforce_eager=True, enable_prefix_caching=False,
                  max_model_len=context + 8, max_num_seqs=1, max_num_batched_tokens=chunk, seed=0,
                  disable_hybrid_kv_cache_manager=not hybrid, gpu_memory_utilization=0.3)
        engine = llm.llm_engine
        scheduler = engine.engine_core.engine_core.scheduler
        params = SamplingParams(max_tokens=4, min_tokens=4, ignore_eos=True, temperature=0.0)
        engine.add_request("kv", TokensPrompt(prompt_token_ids=ids[0].tolist()), params)
        held, produced = None, 0
        while engine.has_unfinished_requests():
            produced = max([produced] + [len(o.outputs[0].token_ids) for o in engine.step()])
            if produced >= 2 and held is None:  # one decode step after the prefill: the steady state
                held = vllm_blocks_held(scheduler)
        return _vllm_result(scheduler.kv_cache_config, held, len(spec.layers), hybrid)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def vllm_blocks_held(scheduler) -> list[int]:
    """Blocks (not vLLM's null placeholder) the one live request holds in each KV-cache group (vLLM
    suffixes request ids, so the request is found as the only one alive)."""
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    return [sum(not b.is_null for blocks in m.req_to_blocks.values() for b in blocks) for m in managers]


def vllm_bytes_per_layer(config, held: list[int], n_layers: int) -> list[int]:
    """Bytes of K/V per layer: the blocks held in the layer's KV-cache group x the group's page size (a
    block id belongs to one group at a time, so a block is counted once, in its group's layers)."""
    per_layer = [0] * n_layers
    for group, blocks in zip(config.kv_cache_groups, held, strict=True):
        for name in group.layer_names:
            per_layer[_vllm_layer_index(name)] = blocks * group.kv_cache_spec.page_size_bytes
    return per_layer


def _vllm_result(config, held: list[int] | None, n_layers: int, hybrid: bool) -> dict:
    if held is None:
        raise RuntimeError("vLLM finished the request before its cache could be read")
    per_layer = vllm_bytes_per_layer(config, held, n_layers)
    groups = []
    for group, blocks in zip(config.kv_cache_groups, held, strict=True):
        s = group.kv_cache_spec
        groups.append({"spec": type(s).__name__, "layers": [_vllm_layer_index(n) for n in group.layer_names],
                       "block_size": s.block_size, "page_size_bytes": s.page_size_bytes,
                       "unpadded_page_size_bytes": getattr(s, "unpadded_page_size_bytes", s.page_size_bytes),
                       "num_kv_heads": getattr(s, "num_kv_heads", None), "head_size": getattr(s, "head_size", None),
                       "sliding_window": getattr(s, "sliding_window", None), "blocks_held": blocks})
    import vllm

    return {"per_layer": per_layer, "groups": groups, "hybrid": hybrid, "num_blocks": config.num_blocks,
            "version": vllm.__version__,
            "tensors": [{"size": t.size, "offset": getattr(t, "offset", 0), "layers": len(t.layers),
                         "layer_stride": getattr(t, "layer_stride", None), "block_stride": getattr(t, "block_stride", None)}
                        for t in config.kv_cache_tensors]}


def _in_child(python: str, job: dict, timeout_s: float) -> dict:
    """Run ``job`` through :func:`_main` in a child process of ``python``; its result, or its one-line error."""
    import subprocess
    import tempfile
    from pathlib import Path

    from .adapters.base import AdapterError, last_error_line

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.json"
        path.write_text(json.dumps(job))
        proc = subprocess.run([python, "-m", "harness.kvmeasure", str(path), str(Path(tmp) / "out.json")],
                              capture_output=True, text=True, timeout=timeout_s, cwd=Path(__file__).parents[1])
        if proc.returncode != 0:
            raise AdapterError(f"{job['impl']}: {last_error_line(proc.stderr) or f'exit {proc.returncode}'}")
        result = json.loads((Path(tmp) / "out.json").read_text())
        result["log"] = proc.stderr
        return result


def measure_vllm(twin: dict, context: int, dtype: torch.dtype, hybrid: bool = True, timeout_s: float = 3600) -> dict:
    """:func:`measure_vllm_here` in vLLM's interpreter; the prompt is ``context - 1`` tokens, so after
    its first decode step the cache holds ``context``."""
    from .bench.runner import python_for

    job = {"impl": "vllm", "twin": twin, "context": context - 1, "dtype": _dtype_name(dtype), "hybrid": hybrid}
    result = _in_child(python_for("vllm"), job, timeout_s)
    result.pop("log")
    return result


_LLAMA_CACHE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers")
_LLAMA_LAYER = re.compile(r"llama_kv_cache: layer +(\d+): (dev|filtered)")


def measure_llamacpp(context: int, swa_full: bool = True, ubatch: int = 512, timeout_s: float = 600) -> dict:
    """llama.cpp's KV cache for the real Gemma 3 270M GGUF (llama-cpp-python) with ``n_ctx = context``:
    the buffers it allocates at context creation, per layer, read from its log (MiB to 2 decimals).
    ``swa_full``: llama.cpp's default (sliding layers sized as full ones) or not."""
    import sys

    job = {"impl": "llamacpp", "context": context, "ubatch": ubatch, "swa_full": swa_full}
    result = _in_child(sys.executable, job, timeout_s)
    return {**parse_llama_log(result.pop("log"), result["n_layers"]), **result}


def parse_llama_log(log: str, n_layers: int) -> dict:
    """Per-layer bytes of llama.cpp's KV caches from its log: each cache lists its layers (``dev`` = kept,
    ``filtered`` = another cache's) and then its size, spread evenly over its layers."""
    per_layer, caches, kept = [0.0] * n_layers, [], []
    for line in log.splitlines():
        if m := _LLAMA_LAYER.search(line):
            if m.group(2) == "dev":
                kept.append(int(m.group(1)))
        elif m := _LLAMA_CACHE.search(line):
            size = float(m.group(1)) * 2**20
            caches.append({"mib": float(m.group(1)), "cells": int(m.group(2)), "layers": kept})
            for i in kept:
                per_layer[i] = size / len(kept)
            kept = []
    if not caches:
        raise ValueError("llama.cpp printed no KV cache sizes (was it built without logging?)")
    return {"per_layer": per_layer, "caches": caches}


def _llamacpp_here(context: int, ubatch: int, swa_full: bool) -> dict:
    import llama_cpp

    from reference_impl import gguf_loader

    path = gguf_loader.fetch_gemma3_270m(None)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=ubatch, n_ubatch=ubatch, verbose=True,
                          swa_full=swa_full, type_k=1, type_v=1)  # GGML_TYPE_F16: the same 2 bytes as the others' bf16
    llm.eval(list(range(10, 10 + min(context - 1, 2 * ubatch))))  # a few batches through the cache
    return {"n_layers": llama_cpp.llama_model_n_layer(llm.model), "version": llama_cpp.__version__}


def _main(job_path: str, out_path: str) -> None:

    job = json.loads(open(job_path).read())
    if job["impl"] == "llamacpp":
        result = _llamacpp_here(job["context"], job["ubatch"], job["swa_full"])
    else:
        result = measure_vllm_here(job["twin"], job["context"], getattr(torch, job["dtype"]), hybrid=job["hybrid"])
    with open(out_path, "w") as f:
        json.dump(result, f)


MEASURES: dict[str, Callable[..., list[int]]] = {"reference": measure_reference, "hf": measure_hf}


# --- explanations: what each implementation holds beyond (or short of) the analytic minimum -------------
#
# A rule maps (layer, tokens, block size) to (tokens held, values per token) and has the one line the
# report prints. An implementation's explanation is its rules in order, applied to the analytic minimum;
# each rule's share of the difference is the bytes it moves. tests/test_kvmeasure.py measures every
# implementation and fails when a measured figure differs from its explanation's prediction: a change in
# what an implementation holds cannot pass without its explanation changing with it.


def _both_on_k_eq_v(layer, held, values, block):
    return held, 2 if layer.k_eq_v else values


def _window_minus_one(layer, held, values, block):
    return (min(held, layer.window - 1) if layer.window is not None and layer.has_kv else held), values


def _blocks_full(layer, held, values, block):
    return (math.ceil(held / block) * block if layer.window is None and held else held), values


def _blocks_of_window(tokens):
    def rule(layer, held, values, block):
        if layer.window is None or not held:
            return held, values
        first, last = max(0, tokens - layer.window + 1), tokens - 1  # the positions the next query sees
        return (last // block - first // block + 1) * block, values
    return rule


def _sliding_as_full(tokens):
    def rule(layer, held, values, block):
        return (math.ceil(tokens / block) * block if layer.window is not None and layer.has_kv else held), values
    return rule


def _one_page_size(spec: ModelSpec):
    """One KV-cache group for every layer: each layer's page padded to the largest (in token-equivalents
    of the layer's own geometry, so the bytes come out at the largest page's size)."""
    largest = max(layer.num_kv_heads * layer.head_dim * 2 for layer in spec.layers if layer.has_kv)

    def rule(layer, held, values, block):
        own = layer.num_kv_heads * layer.head_dim * values
        return (held * largest / own if layer.has_kv else held), values
    return rule


def _llamacpp_swa_cells(tokens, ubatch, pad=256):
    def rule(layer, held, values, block):
        if layer.window is None or not layer.has_kv:
            return held, values
        return min(tokens, math.ceil((layer.window + ubatch) / pad) * pad), values
    return rule


EXPLANATIONS = {
    "reference": [("K=V layers store V beside K (the minimum keeps the one projection)", lambda t, o: _both_on_k_eq_v),
                  ("sliding layers keep window-1 tokens between steps (the next query's own K/V completes "
                   "the window)", lambda t, o: _window_minus_one)],
    "hf": [("K=V layers store V beside K (DynamicCache keeps key and value tensors)", lambda t, o: _both_on_k_eq_v),
           ("sliding layers keep window-1 tokens (DynamicSlidingWindowLayer)", lambda t, o: _window_minus_one)],
    "vllm": [("K=V layers store V beside K (one K and one V page per block)", lambda t, o: _both_on_k_eq_v),
             ("full layers: tokens rounded up to whole blocks", lambda t, o: _blocks_full),
             ("sliding layers: the blocks the last window-1 tokens touch (the window rarely starts on a "
              "block boundary)", lambda t, o: _blocks_of_window(t))],
    "vllm-nohybrid": [("K=V layers store V beside K", lambda t, o: _both_on_k_eq_v),
                      ("full layers: tokens rounded up to whole blocks", lambda t, o: _blocks_full),
                      ("hybrid allocator off: sliding layers get blocks for every token, as full layers do",
                       lambda t, o: _sliding_as_full(t)),
                      ("hybrid allocator off: one page size for every layer, smaller pages padded to the largest "
                       "(Gemma 4's two head geometries)", lambda t, o: _one_page_size(o["spec"]))],
    "llamacpp": [("K=V layers store V beside K", lambda t, o: _both_on_k_eq_v),
                 ("swa_full (llama.cpp's default): sliding layers get n_ctx cells, as full layers do",
                  lambda t, o: _sliding_as_full(t))],
    "llamacpp-swa": [("K=V layers store V beside K", lambda t, o: _both_on_k_eq_v),
                     ("swa_full=false: sliding layers get the window plus one micro-batch of cells, padded to "
                      "256 (n_swa + n_ubatch)", lambda t, o: _llamacpp_swa_cells(t, o.get("ubatch", 512)))],
}


def explain(impl: str, spec: ModelSpec, tokens: int, dtype_bytes: float, block: int | list[int] = 1,
            options: dict | None = None) -> dict:
    """The prediction of ``impl``'s per-layer bytes after ``tokens`` tokens, from the analytic minimum
    through its rules, with each rule's share of the difference (bytes; a rule that moves nothing for
    this model is left out)."""
    state = [(tokens_held(layer, tokens), 1 if layer.k_eq_v else 2) for layer in spec.layers]

    def per_layer(rows):  # (tokens held, values per token) per layer -> bytes per layer
        return [h * v * layer.num_kv_heads * layer.head_dim * dtype_bytes
                for (h, v), layer in zip(rows, spec.layers, strict=True)]

    def total(rows):
        return sum(per_layer(rows))

    blocks = block if isinstance(block, list) else [block] * len(spec.layers)
    steps = []
    for line, make in EXPLANATIONS[impl]:
        rule = make(tokens, {"spec": spec, **(options or {})})
        new = [rule(layer, h, v, b) if layer.has_kv else (0, v)
               for (h, v), layer, b in zip(state, spec.layers, blocks, strict=True)]
        delta = total(new) - total(state)
        if delta:
            steps.append({"why": line, "bytes": delta})
        state = new
    return {"per_layer": per_layer(state), "steps": steps}


# --- a measurement run: records, resume, the comparison ------------------------------------------------

IMPLS = ("reference", "hf", "vllm", "vllm-nohybrid", "llamacpp", "llamacpp-swa")
SCHEMA = "gemma-harness/kv-record/1"
REAL_MODEL = "gemma-3-270m"  # llama.cpp runs the real GGUF, so only this model


def record_id(model: str, context: int, impl: str, dtype: str) -> str:
    return f"{model}@{context}:{impl}:{dtype}"


def _measure(impl: str, twin: dict, context: int, dtype: torch.dtype) -> tuple[list[float], list[int] | int, dict]:
    """(per-layer bytes, block size(s), details) of one implementation."""
    if impl in ("reference", "hf"):
        return MEASURES[impl](twin, context, dtype), 1, {}
    if impl.startswith("vllm"):
        result = measure_vllm(twin, context, dtype, hybrid=impl == "vllm")
        blocks = [1] * len(result["per_layer"])
        for group in result["groups"]:
            for i in group["layers"]:
                blocks[i] = group["block_size"]
        return result["per_layer"], blocks, {"groups": result["groups"], "num_blocks": result["num_blocks"],
                                             "vllm": result["version"]}
    result = measure_llamacpp(context, swa_full=impl == "llamacpp")
    return result["per_layer"], 1, {"caches": result["caches"], "llama_cpp_python": result["version"]}


def measure_one(model: str, context: int, impl: str, dtype: str = "bfloat16") -> dict:
    """One record: ``impl``'s measured KV for ``model`` at ``context`` tokens beside the analytic figures
    and its explanation (see the module docstring for the twin and the scaling)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
    if impl.startswith("llamacpp") and model != REAL_MODEL:
        raise ValueError(f"{impl} runs the real {REAL_MODEL} GGUF only, not {model}")
    config = configs.hf_config(model)
    full = ModelSpec.from_hf_config(config)
    cut = None if impl.startswith("llamacpp") else cut_for(config)
    twin = config if impl.startswith("llamacpp") else kv_twin(config, cut)
    spec = ModelSpec.from_hf_config(twin)
    torch_dtype = getattr(torch, dtype)
    size = dtype_bytes(torch_dtype)
    measured, block, details = _measure(impl, twin, context, torch_dtype)
    predicted = explain(impl, spec, context, size, block)["per_layer"]
    tolerance = 0.005 * 2**20 if impl.startswith("llamacpp") else 0  # its log prints MiB to 2 decimals
    residual = [m - p for m, p in zip(measured, predicted, strict=True)]
    full_block = block if isinstance(block, int) else max(block)
    from .kvcache import breakdown

    analytic = breakdown(full, context, 1, dtype if dtype in DTYPE_BYTES else "bfloat16")
    return {"schema": SCHEMA, "kind": "kv", "id": record_id(model, context, impl, dtype), "model": model,
            "context": context, "impl": impl, "dtype": dtype, "status": "ok",
            "layers": len(spec.layers), "layers_total": len(full.layers), "cut": cut is not None,
            "twin": not impl.startswith("llamacpp"),
            "per_layer": measured, "predicted_per_layer": predicted, "block": block,
            "measured_bytes": scaled_total(measured, spec, full) if cut else sum(measured),
            "analytic_minimal_bytes": analytic["minimal_bytes"], "analytic_stored_bytes": analytic["stored_bytes"],
            "explanation": explain(impl, full, context, size, full_block)["steps"],
            "residual_bytes": sum(residual), "explained": all(abs(r) <= tolerance for r in residual),
            "details": details}


def run(models: list[str], contexts: list[int], impls: list[str], out_dir, dtype: str = "bfloat16",
        resume: bool = False, progress=print) -> list[dict]:
    """Measure every (model, context, impl) into ``out_dir/records.jsonl`` (one line each as it finishes;
    ``resume`` skips those already there), then write ``report.md``. A failure is that record's
    ``error`` with one line; an implementation that is not installed is ``unsupported``."""
    import time
    from pathlib import Path

    from .atomic import write_atomic
    from .bench.context import environment
    from .bench.records import append_record, drop_errors, iter_records, records_path

    path = records_path(out_dir)
    if resume:  # this run's errors are measured again; other runs' records (errors included) stay
        wanted = {record_id(m, c, i, dtype) for m in models for c in contexts for i in impls}
        drop_errors(path, SCHEMA, "id", ids=wanted)
    done = {r["id"] for r in iter_records(path, SCHEMA, "id")} if resume and path.exists() else set()
    if not resume and path.exists():
        path.unlink()
    env = environment("cpu")
    for model in models:
        longest = configs.hf_config(model).get("max_position_embeddings") or max(contexts)
        for context in (c for c in contexts if c <= longest):
            for impl in impls:
                if impl.startswith("llamacpp") and model != REAL_MODEL:
                    continue
                key = record_id(model, context, impl, dtype)
                if key in done:
                    continue
                started = time.monotonic()
                try:
                    record = measure_one(model, context, impl, dtype)
                except Exception as exc:  # noqa: BLE001 - one line in the record, the run goes on
                    record = _failed(model, context, impl, dtype, exc)
                record["duration_s"] = round(time.monotonic() - started, 1)
                record["context_env"] = env
                append_record(path, record)
                progress(summary(record))
    records = list(iter_records(path, SCHEMA, "id"))
    write_atomic(Path(out_dir) / "report.md", markdown(records))
    return records


def _failed(model, context, impl, dtype, exc) -> dict:
    from .adapters.base import last_error_line

    missing = isinstance(exc, ImportError) or "No module named" in str(exc)
    reason = last_error_line(f"{type(exc).__name__}: {exc}") or type(exc).__name__
    return {"schema": SCHEMA, "kind": "kv", "id": record_id(model, context, impl, dtype), "model": model,
            "context": context, "impl": impl, "dtype": dtype, "status": "unsupported" if missing else "error",
            "reason": reason}


def _mib(n) -> str:
    return f"{n / 2**20:,.1f}"


def summary(record: dict) -> str:
    head = f"{record['model']} {record['context']:>6} tokens {record['impl']:<14}"
    if record["status"] != "ok":
        return f"{head} {record['status']}: {record['reason']}"
    verdict = "explained" if record["explained"] else f"NOT explained (residual {record['residual_bytes']:+,} B)"
    return (f"{head} {_mib(record['measured_bytes'])} MiB measured, {_mib(record['analytic_minimal_bytes'])} "
            f"MiB minimal: {verdict}")


def markdown(records: list[dict]) -> str:
    """The comparison table: measured (scaled to the released layer count where cut) against the
    analytic minimum and stored figures, each difference with its one-line reason."""
    lines = ["# KV cache: analytic vs measured, per implementation", "",
             "Measured = the bytes each implementation's cache holds after a prefill of *context* tokens "
             "(vLLM: after its first decode step; llama.cpp: what it allocates for `n_ctx = context`). "
             "Models are KV twins of the released configs (every layer's KV geometry kept; hidden, MLP, "
             "vocabulary and query heads shrunk), cut to the first layers that hold every layer type where "
             "marked, and scaled per layer type to the released depth. llama.cpp runs the real Gemma 3 270M "
             "GGUF. Minimal: K=V layers keep their one projection; stored: K and V both. The minimal column is "
             "the memory planner's KV term (`gemma-harness plan`).", "",
             "| model | context | implementation | measured MiB | minimal MiB | stored MiB | measured / minimal "
             "| differences (one line each, MiB) | explained |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["model"], r["context"], IMPLS.index(r["impl"]) if r["impl"] in IMPLS
                                             else 99)):
        model = f"{r['model']} ({r['layers']}/{r['layers_total']} layers, scaled)" if r.get("cut") else r["model"]
        if r["status"] != "ok":
            lines.append(f"| {model} | {r['context']:,} | {r['impl']} | {r['status']}: {r['reason']} | | | | | |")
            continue
        why = "<br>".join(f"{s['why']} ({s['bytes'] / 2**20:+,.2f})" for s in r["explanation"]) or "none"
        ratio = r["measured_bytes"] / r["analytic_minimal_bytes"] if r["analytic_minimal_bytes"] else float("nan")
        ok = "yes" if r["explained"] else f"**no** (residual {r['residual_bytes']:+,} B)"
        lines.append(f"| {model} | {r['context']:,} | {r['impl']} | {_mib(r['measured_bytes'])} | "
                     f"{_mib(r['analytic_minimal_bytes'])} | {_mib(r['analytic_stored_bytes'])} | {ratio:.3f} | "
                     f"{why} | {ok} |")
    env = next((r.get("context_env") for r in records if r.get("context_env")), None) or {}
    lines += ["", "Environment: " + ", ".join(f"{k} {env[k]}" for k in ("harness", "git", "torch", "transformers",
                                                                          "python") if env.get(k)), ""]
    return "\n".join(lines)


def analytic_per_layer(spec: ModelSpec, context: int, dtype_bytes: float, stored: bool = True) -> list[float]:
    from .kvcache import layer_kv_bytes

    return [layer_kv_bytes(layer, context, 1, dtype_bytes, stored) for layer in spec.layers]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_bytes(dtype: torch.dtype) -> float:
    return DTYPE_BYTES[_dtype_name(dtype)]


if __name__ == "__main__":
    import sys

    _main(*sys.argv[1:3])
