"""Implementation adapters: one model, several implementations, the same named probes.

An adapter is any object with::

    name: str
    def load(self, hf_config: dict, state_dict: dict[str, Tensor], dtype: torch.dtype) -> None
    def run(self, batch: Batch) -> dict[str, Tensor]

``load`` builds the implementation for an HF config dict and fills it with an HF-named state dict
in ``dtype``. ``run`` does one forward pass over ``batch`` (input_ids, attention_mask,
position_ids; see :class:`harness.synthetic.Batch`) and returns the probes it can capture, by
canonical name (``embed``, ``layers.{i}.attn``, ``layers.{i}.mlp``, ``layers.{i}.out``,
``final_norm``, ``logits``), each shaped (batch, tokens, ...). A probe it cannot capture is left
out (and may be explained in an optional ``unsupported: dict[str, str]`` attribute): the gate
reports it as unsupported and judges the rest. ``logits`` is required.

Optional, for the cache and decoding properties (``suites/``)::

    def decode(self, batch: Batch, chunks: list[int]) -> dict[str, Tensor]

feeds the batch through the implementation's own KV cache ``chunks`` tokens at a time (e.g. a
prefill of 5 then single steps) and returns the same probes as ``run``, concatenated over the
chunks. An HF-compatible class is decoded through its own ``past_key_values`` / ``use_cache`` API,
never by re-running the whole sequence: the point is to test the port's cache. An adapter without
``decode`` has the decode properties reported as unsupported.
"""

from .base import Adapter, AdapterError, resolve
from .hf import HFCausalLMAdapter, hf_adapter
from .reference import ReferenceAdapter

__all__ = ["Adapter", "AdapterError", "HFCausalLMAdapter", "ReferenceAdapter", "hf_adapter", "resolve"]
