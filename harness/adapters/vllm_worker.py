"""Runs inside its own process: load one model directory in vLLM, capture the probes, greedy-decode.

``python -m harness.adapters.vllm_worker REQUEST.json`` reads::

    {"model_dir": ..., "dtype": "float32", "prompts": [[ids], ...], "decode_steps": 8,
     "prefill_chunk": null | tokens, "out": "result.pt"}

and writes ``out`` with ``torch.save``: per prompt the probes (tokens, ...) captured by forward hooks,
the full-vocabulary log-probabilities of every prompt position (``logits``: position i predicts
token i + 1), and the greedy continuation with its full-vocabulary log-probabilities per step; plus
versions and timings. Any failure exits non-zero with the exception as the last line of stderr.

vLLM runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, eager, no prefix cache), so hooks
on the engine's own model object see every layer. vLLM's Gemma 1-3 layers return ``(h, residual)``
with the residual add fused into the next norm: the residual stream after layer i is ``h + residual``
(one add in the model dtype, as the fused kernel does it). Gemma 4 layers return the stream itself.
With ``prefill_chunk`` vLLM prefills each prompt that many tokens per forward (chunked prefill, each
chunk attending to the cached keys of the earlier ones); the hooks then see one call per chunk and
the probes are their concatenation.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; tiny models need little

import torch  # noqa: E402

from .hf import _first  # noqa: E402


def _named(name: str, position: int):
    """Pick a module's input: keyword ``name``, else positional argument ``position``."""
    return lambda args, kwargs: kwargs[name] if name in kwargs else (args[position] if len(args) > position else None)


class Capture:
    """Forward hooks on a vLLM Gemma model writing flat (tokens, ...) tensors into ``self.probes``."""

    def __init__(self, model: torch.nn.Module, top_k: int = 0):
        self.top_k = top_k  # experts per token (MoE models)
        self.probes: dict[str, list[torch.Tensor]] = {}  # one (tokens, ...) tensor per forward call
        self.on = False
        inner = model.model
        layers = list(inner.layers)
        self._hooks = []
        self._pre(layers[0], lambda args, kwargs: kwargs.get("hidden_states", args[1] if len(args) > 1 else None),
                  "embed")
        for i, layer in enumerate(layers):
            p = f"layers.{i}"
            self._pre(layer.self_attn, _named("hidden_states", 1), f"{p}.attn_input")
            self._post(layer.self_attn, f"{p}.attn")
            self._pre(layer.mlp, _named("x", 0), f"{p}.mlp_input")
            self._post(layer.mlp, f"{p}.mlp")
            self._post(layer, f"{p}.out", self._stream)
            if getattr(layer, "router", None) is not None:
                self._moe(layer, p)
            if getattr(layer, "per_layer_projection", None) is not None:
                self._pre(layer.per_layer_projection, _named("input", 0), f"{p}.ple_input")
                self._post(layer.per_layer_projection, f"{p}.ple")
        # Gemma 1-3 fuse the last residual add into the final norm: norm(h, residual) reads h + residual
        self._pre(inner.norm, lambda args, kwargs: args[0] if len(args) < 2 or args[1] is None else args[0] + args[1],
                  "final_norm_input")
        self._post(inner.norm, "final_norm")

    @staticmethod
    def _stream(output):
        h, residual = output if isinstance(output, tuple) else (output, None)
        return h if residual is None else h + residual

    def _keep(self, name, value):
        if self.on and value is not None:
            self.probes.setdefault(name, []).append(value.detach().clone())

    def _post(self, module, name, pick=_first):
        self._hooks.append(module.register_forward_hook(lambda m, a, out: self._keep(name, pick(out))))

    def _pre(self, module, pick, name):
        self._hooks.append(module.register_forward_pre_hook(lambda m, a, kw: self._keep(name, pick(a, kw)),
                                                            with_kwargs=True))

    def _moe(self, layer, p):
        router, top_k = layer.router, self.top_k

        def routed(module, args, logits):
            if not self.on:
                return
            weights, experts = router.routing_function(args[0], logits, top_k, True)
            dispatch = torch.zeros(logits.shape, dtype=torch.float32).scatter(-1, experts.long(), weights.float())
            self._keep(f"{p}.router", dispatch)
            self._keep(f"{p}.router_probs", torch.softmax(logits.float(), dim=-1))
            self._keep(f"{p}.router_input", args[0])

        self._hooks.append(router.register_forward_hook(routed))
        self._pre(layer.experts, _named("hidden_states", 0), f"{p}.moe_input")
        self._post(layer.experts, f"{p}.moe")


def _dense(logprobs, vocab: int) -> torch.Tensor:
    """FlatLogprobs / list of {id: Logprob} -> (positions, vocab) float32; every id must be present."""
    rows = []
    for position in logprobs:
        row = torch.full((vocab,), float("nan"))
        for token, lp in position.items():
            if token < vocab:
                row[token] = lp.logprob
        if torch.isnan(row).any():
            raise RuntimeError(f"vLLM returned log-probabilities for {int((~torch.isnan(row)).sum())} of {vocab} ids")
        rows.append(row)
    return torch.stack(rows) if rows else torch.empty(0, vocab)  # a 1-token prompt has no prompt log-probs


def main(request_path: str) -> None:
    request = json.loads(open(request_path).read())
    started = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = request["prompts"]
    longest = max(len(p) for p in prompts) + request["decode_steps"] + 1
    config = json.loads(open(os.path.join(request["model_dir"], "config.json")).read())
    vocab = int(config["vocab_size"])
    chunk = request.get("prefill_chunk")
    llm = LLM(model=request["model_dir"], runner="generate", dtype=request["dtype"], enforce_eager=True, enable_prefix_caching=False,
              max_model_len=max(longest, 64), max_num_seqs=1, max_logprobs=-1, seed=0,
              enable_chunked_prefill=bool(chunk), max_num_batched_tokens=chunk or max(longest, 64),
              gpu_memory_utilization=0.3)
    loaded = time.perf_counter()
    captures = llm.apply_model(lambda model: Capture(model, int(config.get("top_k_experts") or 0)))
    capture = captures[0] if isinstance(captures, list) else captures
    if not isinstance(capture, Capture):
        raise RuntimeError("the vLLM model is not in this process (set VLLM_ENABLE_V1_MULTIPROCESSING=0)")

    probe_params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=-1, logprobs=-1, flat_logprobs=True)
    results = []
    for ids in prompts:
        capture.probes, capture.on = {}, True
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], probe_params, use_tqdm=False)[0]
        capture.on = False
        n = len(ids)
        probes = {}
        for name, parts in capture.probes.items():
            value = torch.cat(parts)
            if value.shape[0] != n:
                raise RuntimeError(f"probe {name} captured {value.shape[0]} tokens over {len(parts)} forward calls, "
                                   f"expected {n}")
            probes[name] = value.float().cpu()
        # prompt_logprobs[i] is log p(token i | tokens < i): position i - 1's prediction; [0] is None.
        prompt = _dense(out.prompt_logprobs[1:], vocab)
        last = _dense(out.outputs[0].logprobs[:1], vocab)
        probes["logits"] = torch.cat([prompt, last])
        results.append({"probes": probes, "prefill_calls": len(capture.probes["embed"])})
    prefilled = time.perf_counter()

    steps = request["decode_steps"]
    if steps:
        greedy = SamplingParams(max_tokens=steps, temperature=0.0, logprobs=-1, flat_logprobs=True, ignore_eos=True)
        for ids, result in zip(prompts, results, strict=True):
            out = llm.generate([TokensPrompt(prompt_token_ids=ids)], greedy, use_tqdm=False)[0].outputs[0]
            result["greedy_tokens"] = torch.tensor(list(out.token_ids), dtype=torch.long)
            result["greedy_logprobs"] = _dense(out.logprobs, vocab)
    done = time.perf_counter()
    import transformers
    from vllm.platforms import current_platform

    torch.save({
        "rows": results,
        "environment": {"vllm": vllm.__version__, "vllm_transformers": transformers.__version__,
                        "vllm_torch": str(torch.__version__), "vllm_device": current_platform.device_type},
        "timings": {"engine_start_s": loaded - started, "prefill_s": prefilled - loaded, "decode_s": done - prefilled},
    }, request["out"])


if __name__ == "__main__":
    main(sys.argv[1])
