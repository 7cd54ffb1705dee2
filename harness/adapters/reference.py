"""The reference implementation (reference_impl) as an adapter."""

from __future__ import annotations

import torch

from reference_impl.cache import KVCache
from reference_impl.spec import ModelSpec
from reference_impl.weights import build

from ..synthetic import Batch
from .base import Adapter, feed_in_chunks


class LazyLogits:
    """The reference's logits computed on demand, a slice of tokens at a time, from its final norm's
    output: a full-size model's (batch, tokens, 262k-vocabulary) logits are never held whole. Indexed
    as ``lazy[row, start:end]`` -> (tokens, vocab) tensor; ``transform`` (e.g. log-softmax) is applied
    to each slice."""

    def __init__(self, hidden: torch.Tensor, head, vocab: int, transform=None):
        self.hidden, self.head, self.transform = hidden, head, transform
        self.shape = (*hidden.shape[:2], vocab)

    def __getitem__(self, index) -> torch.Tensor:
        row, tokens = index
        with torch.no_grad():
            logits = self.head(self.hidden[row, tokens])
        return self.transform(logits) if self.transform is not None else logits

    def with_transform(self, transform) -> LazyLogits:
        return LazyLogits(self.hidden, self.head, self.shape[-1], transform)


class ReferenceAdapter(Adapter):
    """The reference implementation. ``lazy_logits``: return the logits as :class:`LazyLogits` (the gate
    does so for full-size vocabularies)."""

    name = "reference"

    def __init__(self, lazy_logits: bool = False):
        self.lazy_logits = lazy_logits

    def load(self, hf_config, state_dict, dtype: torch.dtype) -> None:
        self.model = build(ModelSpec.from_hf_config(hf_config), state_dict, dtype)

    @torch.no_grad()
    def run(self, batch: Batch, forced_routing: dict[int, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """All probes; `forced_routing` (layer -> (B, T, K) expert ids) makes MoE layers use those experts."""
        capture: dict[str, torch.Tensor] = {}
        self.model(batch.input_ids, batch.attention_mask, batch.position_ids, capture=capture,
                   forced_routing=forced_routing, with_logits=not self.lazy_logits)
        if self.lazy_logits:
            capture["logits"] = LazyLogits(capture["final_norm"], self.model.head, self.model.spec.vocab_size)
        return capture

    @torch.no_grad()
    def decode(self, batch: Batch, chunks: list[int]) -> dict[str, torch.Tensor]:
        """Feed the batch through the reference KV cache, ``chunks`` tokens at a time; every probe,
        concatenated over the chunks."""
        cache = KVCache.for_model(self.model.spec)

        def step(ids, mask, positions):
            capture: dict[str, torch.Tensor] = {}
            self.model(ids, mask, positions, cache=cache, capture=capture)
            return capture

        return feed_in_chunks(batch, chunks, step)

    def route(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference router of `layer` applied to x (B, T, H): dispatch weights and probabilities, (B, T, E)."""
        return self.model.route(layer, x)

    def stream(self, probe: str, values, batch: Batch) -> torch.Tensor | None:
        """The reference's value of stream probe `probe` from given upstream values (see :meth:`Gemma.stream`)."""
        return self.model.stream(probe, values, batch.input_ids)

    def sublayer(self, probe: str, inputs, batch: Batch, routing: torch.Tensor | None = None) -> torch.Tensor | None:
        """The reference's output of sublayer `probe` on given inputs (see :meth:`Gemma.sublayer`)."""
        return self.model.sublayer(probe, inputs, batch.attention_mask, batch.position_ids, routing)
