"""The adapter protocol and how a ``--candidate MODULE:OBJECT`` string becomes an adapter."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch

from ..synthetic import Batch


class AdapterError(RuntimeError):
    """An implementation could not be built or run; the message says which and why."""


@runtime_checkable
class Adapter(Protocol):
    name: str

    def load(self, hf_config: Mapping, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None: ...

    def run(self, batch: Batch) -> dict[str, torch.Tensor]: ...


def feed_in_chunks(batch: Batch, chunks: list[int], step) -> dict[str, torch.Tensor]:
    """Run ``step(ids, mask_so_far, positions) -> probes`` on consecutive chunks of the batch (a
    prefill, then steps) and return every probe concatenated over the chunks. The step carries the
    implementation's cache from one chunk to the next."""
    parts, start = [], 0
    for size in chunks:
        end = start + size
        parts.append(step(batch.input_ids[:, start:end], batch.attention_mask[:, :end], batch.position_ids[:, start:end]))
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


def resolve(target: str | Adapter | type) -> Adapter:
    """'hf', 'reference', 'vllm', an adapter, an HF-compatible module class, or 'MODULE:OBJECT' naming either."""
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
        label, target = target, _import_object(target)
    else:
        label = getattr(target, "__name__", type(target).__name__)
    if inspect.isclass(target) and issubclass(target, torch.nn.Module):
        return HFCausalLMAdapter(target, name=label)
    if inspect.isclass(target):
        target = target()
    elif callable(target) and not isinstance(target, Adapter):
        target = target()
    if not isinstance(target, Adapter):
        raise AdapterError(
            f"candidate {label!r} is neither an adapter (name, load(), run()) nor a torch module class "
            "with the HF *ForCausalLM interface"
        )
    return target
