"""Worked example of the two candidate forms `gemma-harness conform --candidate` accepts.

1. ``examples.my_port:MyGemma2ForCausalLM`` — a torch module class with the HF ``*ForCausalLM``
   interface. The gate builds it as ``MyGemma2ForCausalLM(hf_config)``, loads the HF state dict,
   calls ``model(input_ids=..., attention_mask=..., position_ids=..., use_cache=False)`` and reads
   ``.logits``; per-layer probes come from forward hooks on ``model.model.layers[i]`` and its
   ``self_attn`` and ``mlp`` (their inputs too), plus ``model.model.embed_tokens`` and ``model.model.norm``.

2. ``examples.my_port:LogitsOnlyAdapter`` — an adapter: a subclass of ``harness.adapters.Adapter``
   with ``name``, ``load()`` and ``run()``. This one returns only logits, so every per-layer probe is
   reported as unsupported (with the reason) and the logits are still judged.

Here both wrap HF Transformers so the example runs anywhere; a real port puts its own code there.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Gemma2ForCausalLM

from harness.adapters import Adapter


class MyGemma2ForCausalLM(Gemma2ForCausalLM):
    """Stands in for a port's own module tree (model.model.layers[i].self_attn / .mlp)."""


class LogitsOnlyAdapter(Adapter):
    name = "logits-only-example"
    unsupported = {"*": "this adapter exposes logits only"}

    def load(self, hf_config: dict, state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        config = AutoConfig.for_model(**hf_config)
        self.model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype).eval()
        self.model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=False)
        self.model.tie_weights()

    @torch.no_grad()
    def run(self, batch) -> dict[str, torch.Tensor]:
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids, use_cache=False)
        return {"logits": out.logits}
