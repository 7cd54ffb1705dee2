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
        self._hooks = []
        self.media = getattr(model, "language_model", None) is not None  # an image-text model
        if self.media:
            self._vision(model)
            model = model.language_model
        inner = model.model
        layers = list(inner.layers)
        if getattr(layers[0], "altup", None) is not None:  # Gemma 3n: n AltUp streams, see _gemma3n
            self._gemma3n(inner, layers)
            return
        self._pre(layers[0], lambda args, kwargs: kwargs.get("hidden_states", args[1] if len(args) > 1 else None),
                  "merge" if self.media else "embed")
        if self.media:  # the text embedding of every id (placeholders included), before vLLM scatters the soft tokens
            embed = inner.embed_input_ids

            def embed_input_ids(input_ids, *args, **kwargs):
                value = embed(input_ids, *args, **kwargs)
                self._keep("embed", value)
                return value

            inner.embed_input_ids = embed_input_ids
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

    def _vision(self, model) -> None:
        """Gemma 3's image path in vLLM: the SigLIP tower's embeddings, encoder layers and post-LayerNorm,
        the projector's average pooling and the projector (``vision.*``, (images, tokens, features))."""
        tower = getattr(model, "vision_tower", None)
        projector = getattr(model, "multi_modal_projector", None)
        if tower is None or projector is None:
            return  # Gemma 4 etc.: not hooked (the adapter reports those probes unsupported)
        tower = getattr(tower, "vision_model", tower)
        self._post(tower.embeddings, "vision.embed")
        for i, layer in enumerate(tower.encoder.layers):
            self._post(layer, f"vision.layers.{i}.out")
        self._post(tower.post_layernorm, "vision.post_norm")
        self._post(projector.avg_pool, "vision.pool", lambda out: out.flatten(2).transpose(1, 2))
        self._post(projector, "vision.proj")
        self._hooks.append(tower.register_forward_pre_hook(
            lambda m, args: self._keep("vision.pixels", args[0] if args else None)))

    def _gemma3n(self, inner, layers) -> None:
        """Gemma 3n (:mod:`harness.gemma3n_probes`): vLLM's layers carry the streams as (n, tokens, H) and
        its ``altup_embed`` returns them as (tokens, H, n); stream probes are kept as (tokens, n * H),
        stream-major. ``embed`` is what ``altup_embed`` reads (the scaled embedding); ``altup_predict`` /
        ``altup_correct`` are the results of the layers' AltUp methods (wrapped on the instance)."""
        flat = lambda s: s.permute(1, 0, 2).reshape(s.shape[1], -1)  # noqa: E731 - (n, T, H) -> (T, n*H)
        decoder = inner.self_decoder
        embed = decoder.altup_embed

        def altup_embed(hidden_states_0):
            streams = embed(hidden_states_0)  # (T, H, n)
            self._keep("embed", hidden_states_0)
            self._keep("altup_streams", streams.permute(0, 2, 1).reshape(streams.shape[0], -1))
            return streams

        decoder.altup_embed = altup_embed
        for i, layer in enumerate(layers):
            p = f"layers.{i}"
            for method, kind in (("predict", "altup_predict"), ("correct", "altup_correct")):
                setattr(layer.altup, method, self._recording(getattr(layer.altup, method), f"{p}.{kind}", flat))
            self._pre(layer.self_attn, _named("hidden_states", 1), f"{p}.attn_input")
            self._post(layer.self_attn, f"{p}.attn")
            self._post(layer.laurel, f"{p}.laurel")
            self._pre(layer.mlp, _named("x", 0), f"{p}.mlp_input")
            self._post(layer.mlp, f"{p}.mlp")
            self._pre(layer.per_layer_projection, _named("input", 0), f"{p}.ple_input")
            self._post(layer.per_layer_projection, f"{p}.ple")
            self._post(layer, f"{p}.out", lambda out: flat(_first(out)))
        self._pre(inner.norm, _named("x", 0), "final_norm_input")
        self._post(inner.norm, "final_norm")

    def _recording(self, method, name, flat):
        def wrapped(*args, **kwargs):
            streams = method(*args, **kwargs)
            self._keep(name, flat(streams))  # a copy: the layer adds the PLE into it in place
            return streams

        return wrapped

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


def _tokens_of(config: dict) -> tuple[int, int, int] | None:
    """(begin, placeholder, end) ids of an image run in a Gemma 3 prompt, or None for a text model."""
    if config.get("model_type") != "gemma3" or "image_token_index" not in config:
        return None
    return config["boi_token_index"], config["image_token_index"], config["eoi_token_index"]


def collapse(ids: list[int], begin: int, placeholder: int, end: int) -> list[int]:
    """The gate's prompt with each image run ``<boi> <image>*N <eoi>`` cut back to ``<boi>``: what vLLM's
    Gemma 3 processing expands (its prompt replacement targets ``<boi>``). vLLM's final prompt ids are
    checked against the gate's afterwards."""
    out, k = [], 0
    while k < len(ids):
        out.append(ids[k])
        if ids[k] == begin and k + 1 < len(ids) and ids[k + 1] == placeholder:
            k += 1
            while k < len(ids) and ids[k] == placeholder:
                k += 1
            if k < len(ids) and ids[k] == end:
                k += 1
            continue
        k += 1
    return out


def _shim_torchvision() -> str:
    """vLLM 0.32's ``gemma3_mm`` imports transformers' torchvision-backed ``Gemma3ImageProcessor`` at module
    level (only as a type annotation); without torchvision (this env removes the CUDA-only wheel) that
    import fails. Alias that module to the PIL backend's, the processor HF itself picks without
    torchvision; the model code is vLLM's own. Returns what was done ('' when torchvision is there)."""
    import importlib.util
    import types

    if importlib.util.find_spec("torchvision") is not None:
        return ""
    from transformers.models.gemma3 import image_processing_pil_gemma3 as pil

    shim = types.ModuleType("transformers.models.gemma3.image_processing_gemma3")
    shim.Gemma3ImageProcessor = pil.Gemma3ImageProcessorPil
    shim.Gemma3ImageProcessorKwargs = pil.Gemma3ImageProcessorKwargs
    sys.modules[shim.__name__] = shim
    # vLLM inspects a lazily registered architecture in a subprocess (without the alias): register its
    # own class, imported here, so it is inspected in this process
    from vllm import ModelRegistry
    from vllm.model_executor.models.gemma3_mm import Gemma3ForConditionalGeneration

    ModelRegistry.register_model("Gemma3ForConditionalGeneration", Gemma3ForConditionalGeneration)
    return "transformers' gemma3 image_processing_gemma3 aliased to its PIL backend (no torchvision)"


def main(request_path: str) -> None:
    request = json.loads(open(request_path).read())
    started = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = request["prompts"]
    longest = max(len(p) for p in prompts) + request["decode_steps"] + 1
    config = json.loads(open(os.path.join(request["model_dir"], "config.json")).read())
    vocab = int((config.get("text_config") or config)["vocab_size"])
    chunk = request.get("prefill_chunk")
    media = torch.load(request["media"], weights_only=True) if request.get("media") else None
    shim, extra = "", {}
    if media is not None:
        run = _tokens_of(config)
        if run is None:
            raise RuntimeError(f"Unsupported: the harness cannot give vLLM's {config['architectures'][0]} its media "
                               "(its processor takes raw images / waveforms; the gate's batch holds processed "
                               "patches and log-mel features)")
        shim = _shim_torchvision()
        most = max(len(m.get("images", [])) for m in media)
        size = int(config["vision_config"]["image_size"])
        extra["limit_mm_per_prompt"] = {"image": {"count": max(most, 1), "width": size, "height": size}}
        extra["mm_processor_cache_gb"] = 0
    llm = LLM(model=request["model_dir"], runner="generate", dtype=request["dtype"], enforce_eager=True, enable_prefix_caching=False,
              max_model_len=max(longest, 64), max_num_seqs=1, max_logprobs=-1, seed=0,
              enable_chunked_prefill=bool(chunk), max_num_batched_tokens=chunk or max(longest, 64),
              gpu_memory_utilization=0.3, **extra)
    loaded = time.perf_counter()
    captures = llm.apply_model(lambda model: Capture(model, int(config.get("top_k_experts") or 0)))
    capture = captures[0] if isinstance(captures, list) else captures
    if not isinstance(capture, Capture):
        raise RuntimeError("the vLLM model is not in this process (set VLLM_ENABLE_V1_MULTIPROCESSING=0)")

    probe_params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=-1, logprobs=-1, flat_logprobs=True)
    def prompt_of(row: int, ids: list[int]) -> TokensPrompt:
        if media is None:
            return TokensPrompt(prompt_token_ids=ids)
        images = [image.numpy() for image in media[row].get("images", [])]
        if not images:
            return TokensPrompt(prompt_token_ids=ids)
        return TokensPrompt(prompt_token_ids=collapse(ids, *_tokens_of(config)), multi_modal_data={"image": images})

    results = []
    for row, ids in enumerate(prompts):
        capture.probes, capture.on = {}, True
        out = llm.generate([prompt_of(row, ids)], probe_params, use_tqdm=False)[0]
        capture.on = False
        if list(out.prompt_token_ids) != list(ids):
            raise RuntimeError(f"vLLM's prompt ids after its multimodal processing differ from the gate's (row {row}: "
                               f"{len(out.prompt_token_ids)} ids vs {len(ids)})")
        n = len(ids)
        probes = {}
        pixels = capture.probes.pop("vision.pixels", None)
        if pixels is not None:
            given = torch.stack([torch.from_numpy(image.numpy()).permute(2, 0, 1) for image in media[row]["images"]])
            got = torch.cat(pixels).cpu()
            given = given.to(got.dtype).float()  # vLLM hands the tower its pixels in the model dtype, as HF does
            got = got.float()
            if got.shape != given.shape or not torch.equal(got, given):
                diff = (got - given).abs().max().item() if got.shape == given.shape else f"shape {tuple(got.shape)}"
                raise RuntimeError(f"vLLM's vision tower read other pixels than the gate's (row {row}: {diff})")
        for name, parts in capture.probes.items():
            value = torch.cat(parts)
            if name.startswith(("vision.", "audio.")):
                probes[name] = value.float().cpu()
                continue
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
        for row, (ids, result) in enumerate(zip(prompts, results, strict=True)):
            out = llm.generate([prompt_of(row, ids)], greedy, use_tqdm=False)[0].outputs[0]
            result["greedy_tokens"] = torch.tensor(list(out.token_ids), dtype=torch.long)
            result["greedy_logprobs"] = _dense(out.logprobs, vocab)
    done = time.perf_counter()
    import transformers
    from vllm.platforms import current_platform

    torch.save({
        "rows": results,
        "environment": {**({"vllm_shim": shim} if shim else {}), "vllm": vllm.__version__, "vllm_transformers": transformers.__version__,
                        "vllm_torch": str(torch.__version__), "vllm_device": current_platform.device_type},
        "timings": {"engine_start_s": loaded - started, "prefill_s": prefilled - loaded, "decode_s": done - prefilled},
    }, request["out"])


if __name__ == "__main__":
    main(sys.argv[1])
