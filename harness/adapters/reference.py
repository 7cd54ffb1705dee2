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
                   forced_routing=forced_routing, with_logits=not self.lazy_logits, **batch.media)
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

    @torch.no_grad()
    def bench_generate(self, input_ids: torch.Tensor, steps: int, on_token) -> None:
        """Greedy through the reference KV cache: a prefill whose LM head runs on the last token only
        (as HF's generate does), then one token per step."""
        model = self.model
        self._cache = cache = KVCache.for_model(model.spec)
        hidden = model(input_ids, cache=cache, with_logits=False)  # (B, P, H)
        for step in range(steps):
            tokens = model.head(hidden[:, -1]).argmax(-1)  # (B,)
            on_token(tokens)
            if step + 1 < steps:
                hidden = model(tokens[:, None], cache=cache, with_logits=False)

    def cache_bytes(self) -> int | None:
        cache = getattr(self, "_cache", None)
        if cache is None:
            return None
        return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)

    def to_device(self, device: str) -> None:
        self.model.to(device)
        # the RoPE tables are plain fp32 tensors, not buffers: .to() does not move them
        self.model._inv_freq = {key: inv.to(device) for key, inv in self.model._inv_freq.items()}

    def route(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference router of `layer` applied to x (B, T, H): dispatch weights and probabilities, (B, T, E)."""
        return self.model.route(layer, x)

    def stream(self, probe: str, values, batch: Batch) -> torch.Tensor | None:
        """The reference's value of stream probe `probe` from given upstream values (see :meth:`Gemma.stream`)."""
        return self.model.stream(probe, values, batch.input_ids, **batch.media)

    def sublayer(self, probe: str, inputs, batch: Batch, routing: torch.Tensor | None = None) -> torch.Tensor | None:
        """The reference's output of sublayer `probe` on given inputs (see :meth:`Gemma.sublayer`)."""
        return self.model.sublayer(probe, inputs, batch.attention_mask, batch.position_ids, routing, batch.input_ids)
