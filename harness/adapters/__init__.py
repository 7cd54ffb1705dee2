"""Implementation adapters: one model, several implementations, the same named probes.

The protocol is one documented base class, :class:`harness.adapters.base.Adapter`: ``load()`` and
``run()`` are required; probes a port cannot capture, features it lacks (``padding``,
``position_ids``), ``decode()`` through its own KV cache, ``generate()``, ``prepare_config()``,
``logits_form``, ``families`` and ``close()`` are optional, with defaults that mean "not supported".
Any object with ``name``, ``load()`` and ``run()`` is accepted too (:func:`resolve` wraps it).
Built in: the reference, HF Transformers (and any HF-compatible module class), vLLM and litgpt.
"""

from .base import Adapter, AdapterError, Unsupported, resolve
from .hf import HFCausalLMAdapter, hf_adapter
from .reference import ReferenceAdapter

__all__ = ["Adapter", "AdapterError", "HFCausalLMAdapter", "ReferenceAdapter", "Unsupported", "hf_adapter", "resolve"]
