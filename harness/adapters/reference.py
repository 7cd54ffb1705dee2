"""The reference implementation (reference_impl) as an adapter."""

from __future__ import annotations

import torch

from reference_impl.spec import ModelSpec
from reference_impl.weights import build

from ..synthetic import Batch


class ReferenceAdapter:
    name = "reference"

    def load(self, hf_config, state_dict, dtype: torch.dtype) -> None:
        self.model = build(ModelSpec.from_hf_config(hf_config), state_dict, dtype)

    @torch.no_grad()
    def run(self, batch: Batch, forced_routing: dict[int, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """All probes; `forced_routing` (layer -> (B, T, K) expert ids) makes MoE layers use those experts."""
        capture: dict[str, torch.Tensor] = {}
        self.model(batch.input_ids, batch.attention_mask, batch.position_ids, capture=capture,
                   forced_routing=forced_routing)
        return capture
