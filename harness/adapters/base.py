"""The adapter protocol: one documented base class, and how a ``--candidate MODULE:OBJECT`` string
becomes an adapter.

Every implementation the harness drives (the reference, HF Transformers, vLLM, litgpt, a third-party
port) is an :class:`Adapter`. A port may subclass it, or hand over any object with ``name``,
``load()`` and ``run()``: :func:`resolve` wraps such an object so the gate sees the same interface,
with the defaults below for everything it leaves out.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Mapping

import torch

from ..probes import is_media
from ..synthetic import Batch


class AdapterError(RuntimeError):
    """An implementation could not be built or run; the message says which and why."""


class Unsupported(Exception):  # noqa: N818 - it is a declaration, not an error
    """Raised by an adapter for a feature it lacks on this input, e.g. ``Unsupported("padding", "no
    attention mask input")`` from ``run()`` on a left-padded batch, or from ``decode()`` on a chunk
    schedule it cannot feed. The gate reports the feature as unsupported with the reason and judges
    the rest (a padded batch is rerun row by row without padding). Raised by ``load()``, or with the
    feature ``"model"`` by ``run()``, it means the adapter cannot run this model here at all (a missing
    dependency, inputs it cannot take): the run is reported ``UNSUPPORTED`` with the reason, not run and
    not failed."""

    def __init__(self, feature: str, reason: str):
        super().__init__(f"{feature}: {reason}")
        self.feature, self.reason = feature, reason


# Features an adapter may declare it lacks in ``unsupported`` (besides probe names).
FEATURES = {
    "padding": "a left-padded row in a batch (the gate then runs each row alone, without padding)",
    "position_ids": "explicit position ids (the gate then runs each row alone from position 0, without them)",
}


class Adapter:
    """An implementation under test (or the reference). Subclass it and implement :meth:`load` and
    :meth:`run`; every other member has a default that means "not supported".

    Probes, by canonical name, each shaped (batch, tokens, ...); see :mod:`harness.probes`:

    ``embed``
        the scaled embedding (the residual stream entering layer 0);
    ``layers.{i}.attn_input`` / ``layers.{i}.attn``
        what the attention sublayer reads (the pre-attention norm's output) and its output before the
        post-attention norm;
    ``layers.{i}.mlp_input`` / ``layers.{i}.mlp``
        the dense MLP's input (the pre-MLP norm's output) and its output before its post-norm;
    ``layers.{i}.router_input`` / ``layers.{i}.router`` (MoE)
        the router's input (the post-attention residual) and its dispatch weights (batch, tokens,
        experts): each chosen expert's final weight, 0 elsewhere; optionally ``layers.{i}.router_probs``,
        the router's softmax over all experts (not judged, used for near-tie margins);
    ``layers.{i}.moe_input`` / ``layers.{i}.moe`` (MoE)
        the experts' input (their pre-norm's output) and their weighted sum before its post-norm;
    ``layers.{i}.ple_input`` / ``layers.{i}.ple`` (per-layer embeddings)
        the per-layer projection's input (gelu(gate(x)) * per-layer input) and its output before the
        post-norm;
    ``layers.{i}.out``
        the residual stream after layer i;
    ``final_norm_input`` / ``final_norm``, ``logits`` (required).

    Image-text models (``batch.pixel_values`` given) add the image path, each shaped (images, tokens,
    features), before ``embed``: ``vision.embed`` (patch embedding + positions), ``vision.layers.{i}.out``,
    ``vision.post_norm``, ``vision.pool`` (pooled patch grid), ``vision.proj`` (the soft tokens); and
    after it ``merge``, the embedded text with the soft tokens in place (what layer 0 reads).

    A sublayer whose ``*_input`` is given is judged *alone*: the reference reruns that sublayer on the
    candidate's own input, and the input itself is judged against the reference's stream, so the
    first failing probe names the first wrong operation. Without the input a sublayer is judged
    against the reference's stream (a bug upstream is then blamed on it too).
    """

    name: str = "adapter"
    # probe name, "*" (every probe) or a feature of FEATURES -> why it is not provided
    unsupported: Mapping[str, str] = {}
    # "logits" or "logprobs" (log-probabilities over the vocabulary: the reference is log-softmaxed)
    logits_form: str = "logits"
    # HF model types the implementation can build (None: every generation); the property suites draw only these
    families: tuple[str, ...] | None = None
    # a line the gate appends to the result's inputs (e.g. how prepare_config changed the model)
    config_note: str = ""
    # facts about the implementation for the result's environment (versions, device)
    environment: Mapping[str, object] = {}

    def load(self, hf_config: Mapping, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
        """Build the implementation for an HF config dict and fill it with an HF-named state dict in ``dtype``."""
        raise NotImplementedError

    def run(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One forward pass over ``batch`` (``input_ids``, ``attention_mask``: 1 = token, 0 = left padding,
        ``position_ids``: None when the adapter declared ``position_ids`` unsupported); the probes it
        can capture. Raise :class:`Unsupported` for a feature this batch needs and the adapter lacks."""
        raise NotImplementedError

    def decode(self, batch: Batch, chunks: list[int]) -> dict[str, torch.Tensor]:
        """Feed ``batch`` through the implementation's own KV cache ``chunks`` tokens at a time (a prefill,
        then steps); the same probes as :meth:`run`, concatenated over the chunks. Raise
        ``NotImplementedError`` (or :class:`Unsupported`) for a schedule it cannot feed."""
        raise Unsupported("decode", f"{self.name} has no decode() through its own KV cache")

    def generate(self, batch: Batch, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Greedy continuation of each row for ``steps`` tokens: (tokens (steps,), log-probs (steps, vocab))."""
        raise Unsupported("generate", f"{self.name} has no generate()")

    def bench_generate(self, input_ids: torch.Tensor, steps: int, on_token: Callable[[torch.Tensor], None]) -> None:
        """The benchmark runner's generation: ``input_ids`` (B, P) prompts without padding, on the model's
        device; generate ``steps`` tokens per row greedily, ignoring EOS, through the implementation's own
        fastest path (its KV cache, its ``generate``), and call ``on_token(tokens (B,))`` as soon as each
        step's tokens exist (the runner timestamps the calls). Do no other work between calls."""
        raise Unsupported("generate", f"{self.name} has no bench_generate()")

    def cache_bytes(self) -> int | None:
        """Bytes of K/V the implementation holds after the latest :meth:`bench_generate` (the tensors its
        cache really keeps), or None when it cannot say."""
        return None

    def to_device(self, device: str) -> None:
        """Move the loaded model to ``device`` (``cuda:N``); the default moves ``self.model``."""
        model = getattr(self, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise Unsupported("device", f"{self.name} cannot be moved to {device} (no torch module in .model)")
        model.to(device)

    def prepare_config(self, hf_config: Mapping) -> dict:
        """The variant of a config this implementation can run (e.g. head sizes its kernels have); both
        implementations get it. Default: unchanged."""
        return dict(hf_config)

    def close(self) -> None:
        """Release what :meth:`load` acquired (temporary directories, processes)."""


def supports(adapter: Adapter, method: str) -> bool:
    """Whether ``adapter`` implements an optional method (``decode``, ``generate``)."""
    if isinstance(adapter, _Wrapped):
        return callable(getattr(adapter.inner, method, None))
    return getattr(type(adapter), method, None) is not getattr(Adapter, method)


class _Wrapped(Adapter):
    """Any object with ``name``, ``load()`` and ``run()`` seen through the :class:`Adapter` interface."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, attr):  # only reached for what this class does not define
        return getattr(self.__dict__["inner"], attr)

    def _get(self, attr, default):
        value = getattr(self.inner, attr, default)
        return default if value is None else value

    name = property(lambda self: str(self._get("name", type(self.inner).__name__)))
    unsupported = property(lambda self: self._get("unsupported", {}))
    logits_form = property(lambda self: self._get("logits_form", "logits"))
    families = property(lambda self: getattr(self.inner, "families", None))
    config_note = property(lambda self: self._get("config_note", ""))
    environment = property(lambda self: self._get("environment", {}))

    def load(self, hf_config, state_dict, dtype):
        return self.inner.load(hf_config, state_dict, dtype)

    def run(self, batch):
        return self.inner.run(batch)

    def decode(self, batch, chunks):
        if not supports(self, "decode"):
            return super().decode(batch, chunks)
        return self.inner.decode(batch, chunks)

    def generate(self, batch, steps):
        if not supports(self, "generate"):
            return super().generate(batch, steps)
        return self.inner.generate(batch, steps)

    def bench_generate(self, input_ids, steps, on_token):
        if not supports(self, "bench_generate"):
            return super().bench_generate(input_ids, steps, on_token)
        return self.inner.bench_generate(input_ids, steps, on_token)

    def cache_bytes(self):
        fn = getattr(self.inner, "cache_bytes", None)
        return fn() if callable(fn) else None

    def to_device(self, device):
        fn = getattr(self.inner, "to_device", None)
        if not callable(fn):
            raise Unsupported("device", f"{self.name} has no to_device(); it runs on the CPU only")
        return fn(device)

    def prepare_config(self, hf_config):
        prepare = getattr(self.inner, "prepare_config", None)
        return prepare(hf_config) if callable(prepare) else dict(hf_config)

    def close(self):
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()


_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Exit|Interrupt)\b.*")


def last_error_line(stderr: str) -> str:
    """The last exception line of a child's stderr, with the indented detail lines that follow it
    (pydantic puts the reason there), in one line."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line.strip())]
    if not starts:
        rest = [line.strip() for line in lines if line.strip()]
        return (rest or ["no output"])[-1][:400]
    i = starts[-1]
    detail = [lines[i].strip()]
    for line in lines[i + 1:i + 4]:
        if not line.startswith((" ", "\t")) or not line.strip():
            break
        detail.append(line.strip())
    return " ".join(detail)[:400]


def check_outputs(name: str, out, batch: Batch) -> dict[str, torch.Tensor]:
    """What ``run()`` or ``decode()`` returned, checked: a dict of probe name -> tensor shaped (batch, tokens, ...)."""
    if not isinstance(out, Mapping):
        raise AdapterError(f"{name}: run() returned {type(out).__name__}, expected a dict of probe name -> tensor")
    b, t = batch.input_ids.shape
    for probe, value in out.items():
        if not isinstance(value, torch.Tensor):
            raise AdapterError(f"{name}: probe {probe!r} is {type(value).__name__}, expected a tensor")
        if is_media(probe):  # (images or clips, tokens, ...)
            kind, given = ("clips", batch.audio_features) if probe.startswith("audio.") else ("images", batch.pixel_values)
            items = 0 if given is None else given.shape[0]
            if value.dim() < 3 or value.shape[0] != items:
                raise AdapterError(f"{name}: probe {probe!r} has shape {tuple(value.shape)}, expected "
                                   f"({kind} {items}, tokens, features)")
            continue
        if value.dim() < 2 or tuple(value.shape[:2]) != (b, t):
            raise AdapterError(f"{name}: probe {probe!r} has shape {tuple(value.shape)}, expected "
                               f"(batch {b}, tokens {t}, ...)")
    return dict(out)


def feed_in_chunks(batch: Batch, chunks: list[int], step) -> dict[str, torch.Tensor]:
    """Run ``step(ids, mask_so_far, positions) -> probes`` on consecutive chunks of the batch (a
    prefill, then steps) and return every probe concatenated over the chunks. The step carries the
    implementation's cache from one chunk to the next."""
    parts, start = [], 0
    for size in chunks:
        end = start + size
        positions = None if batch.position_ids is None else batch.position_ids[:, start:end]
        parts.append(step(batch.input_ids[:, start:end], batch.attention_mask[:, :end], positions))
        start = end
    return {name: torch.cat([p[name] for p in parts], dim=1) for name in parts[0]}


def _import_object(target: str):
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise AdapterError(f"candidate {target!r} must look like MODULE:OBJECT (e.g. my_port:MyGemmaForCausalLM)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the candidate's
        raise AdapterError(f"cannot import candidate module {module_name!r}: {type(exc).__name__}: {exc}") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AdapterError(f"candidate module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _is_adapter_like(obj) -> bool:
    return all(callable(getattr(obj, m, None)) for m in ("load", "run"))


BUILTIN = ("hf", "reference", "vllm", "litgpt")


def resolve(target: str | Adapter | type) -> Adapter:
    """'hf', 'reference', 'vllm', 'litgpt', an adapter, an HF-compatible module class, or
    'MODULE:OBJECT' naming either (a class or zero-argument factory is called)."""
    from .hf import HFCausalLMAdapter, hf_adapter
    from .reference import ReferenceAdapter

    if isinstance(target, str):
        if target == "hf":
            return hf_adapter()
        if target == "reference":
            return ReferenceAdapter()
        if target == "vllm":
            from .vllm import VLLMAdapter

            return VLLMAdapter()
        if target == "litgpt":
            try:
                from .litgpt import LitGPTAdapter

                return LitGPTAdapter()
            except ImportError as exc:  # importlib.metadata.PackageNotFoundError included
                raise AdapterError("litgpt is not installed: pip install -e '.[ports]' && pip install --no-deps "
                                   f"litgpt==0.5.13 ({type(exc).__name__}: {exc})") from exc
        label, target = target, _import_object(target)
    else:
        label = getattr(target, "__name__", type(target).__name__)
    if inspect.isclass(target) and issubclass(target, torch.nn.Module):
        return HFCausalLMAdapter(target, name=label)
    if isinstance(target, Adapter):
        return target
    if inspect.isclass(target) or (callable(target) and not _is_adapter_like(target)):
        try:
            target = target()
        except Exception as exc:  # noqa: BLE001 - the candidate's constructor failed
            raise AdapterError(f"candidate {label!r}: constructing it failed: {type(exc).__name__}: {exc}") from exc
    if isinstance(target, Adapter):
        return target
    if not _is_adapter_like(target):
        raise AdapterError(
            f"candidate {label!r} is neither an adapter (name, load(), run()) nor a torch module class "
            "with the HF *ForCausalLM interface"
        )
    return _Wrapped(target)
