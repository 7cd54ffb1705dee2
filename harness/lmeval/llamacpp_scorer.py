"""llama.cpp (llama-cpp-python) as a :class:`~harness.lmeval.scorers.Scorer`, on the real Gemma 3 270M GGUF.

Two files: the Q4_K_M GGUF itself (``llamacpp-q4_k_m``: llama.cpp multiplies the quantized weights by
activations it quantizes too, to Q8_K for the K-quant tensors and Q8_0 for Q5_0/Q8_0 ones, the tied
LM head included), and its all-F32 copy (``llamacpp-f32``, :mod:`harness.lmeval.f32gguf`: float32
weights equal to the reference's). Token ids go in directly (no text, no tokenizer of llama.cpp's), one
row at a time from an empty cache: a row's score cannot depend on the batch.

With ``logits_all=True``, ``Llama.eval`` copies each position's logits into ``Llama.scores`` (an
``(n_ctx, n_vocab)`` float32 array: 1 MiB per position for a 262,144-id vocabulary, allocated lazily by
the OS as positions are written); row ``i`` is the prediction for token ``i + 1``. ``eval_logits`` is
the same data as Python lists and is never used here. Log-softmax is fp32 (torch), in chunks.

llama.cpp keeps its KV cache in F16 by default (``kv_cache="f16"``), also on the F32 file; ``"f32"``
asks for an F32 cache. Measured on 1100 real tokens against the reference: the F32 file's mean KL is
8.4e-7 with the F16 cache and 3.7e-7 with an F32 one; the Q4_K_M file's 4.8e-3 either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .scorers import LoadedModel, Scored, Scorer, ScorerError, pick

INSTALL_HINT = "pip install -e '.[llamacpp]' (builds from its sdist, ~13 min)"
REAL_MODEL = "gemma-3-270m"
CHUNK = 64  # positions per log-softmax chunk: 64 MiB of fp32 logits at a time
_KV_TYPES = {"f32": 0, "f16": 1}  # GGML_TYPE_F32, GGML_TYPE_F16


class LlamaCppNotInstalled(ScorerError):
    """llama-cpp-python is missing (an ``unsupported`` implementation, not a failure)."""


def logsoftmax_rows(logits, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 log-softmax of an (N, V) float32 numpy array (or tensor), CHUNK rows at a time, into ``out``."""
    n = logits.shape[0]
    out = torch.empty((n, logits.shape[1]), dtype=torch.float32) if out is None else out
    for a in range(0, n, CHUNK):
        part = torch.as_tensor(logits[a:a + CHUNK]).float()
        out[a:a + part.shape[0]] = torch.log_softmax(part, dim=-1)
    return out


class LlamaCppScorer(Scorer):
    """llama.cpp on the Q4_K_M GGUF (``f32=False``) or on its all-F32 copy (``f32=True``)."""

    batch_invariant = True  # one row at a time, from an empty cache

    def __init__(self, model: LoadedModel, f32: bool = False, n_ctx: int = 4096, n_threads: int | None = None,
                 n_batch: int = 512, kv_cache: str = "f16"):
        super().__init__()
        self.name = "llamacpp-f32" if f32 else "llamacpp-q4_k_m"
        self.llm = None
        if model.name != REAL_MODEL:
            raise ScorerError(f"{self.name}: llama.cpp runs the real GGUF of {REAL_MODEL} only, not {model.name!r}")
        if kv_cache not in _KV_TYPES:
            raise ScorerError(f"{self.name}: kv_cache must be one of {sorted(_KV_TYPES)}, not {kv_cache!r}")
        try:
            import llama_cpp
        except ImportError:
            raise LlamaCppNotInstalled(f"{self.name}: llama-cpp-python is not installed: {INSTALL_HINT}") from None
        source = Path(model.meta.get("path") or "")
        if not source.is_file():
            raise ScorerError(f"{self.name}: the GGUF the model was read from is missing: {source}")
        path = source
        if f32:
            from .f32gguf import f32_path

            try:
                path = f32_path(src=source)
            except Exception as exc:  # noqa: BLE001 - one line whatever went wrong writing it
                raise ScorerError(f"{self.name}: could not write the F32 copy of {source.name}: {exc}") from None
        self.n_ctx, self.n_batch = int(n_ctx), min(int(n_batch), int(n_ctx))
        threads = {} if n_threads is None else {"n_threads": n_threads, "n_threads_batch": n_threads}
        try:
            self.llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=self.n_ctx, n_batch=self.n_batch,
                                       n_ubatch=self.n_batch, seed=0, verbose=False, type_k=_KV_TYPES[kv_cache],
                                       type_v=_KV_TYPES[kv_cache], **threads)
        except Exception as exc:  # noqa: BLE001 - llama-cpp-python raises ValueError("Failed to load ...")
            raise ScorerError(f"{self.name}: llama.cpp could not load {path}: {exc}") from None
        self.vocab = int(self.llm.n_vocab())
        if self.vocab != len(model.meta.get("tokens") or []):
            raise ScorerError(f"{self.name}: llama.cpp reads {self.vocab} ids, the model has "
                              f"{len(model.meta.get('tokens') or [])}")
        self.path = path
        self.environment = {
            "impl": "llamacpp-f32" if f32 else "llamacpp",
            "llama_cpp_python": llama_cpp.__version__,
            "gguf": str(path),
            "file_type": "F32 (dequantized Q4_K_M values)" if f32 else "Q4_K_M",
            "n_ctx": self.llm.n_ctx(),
            "n_batch": self.n_batch,
            "n_threads": self.llm.context_params.n_threads,
            "n_threads_batch": self.llm.context_params.n_threads_batch,
            "kv_cache": kv_cache,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(" |"),
            "torch": torch.__version__,
        }

    # ------------------------------------------------------------------ running

    def _check(self, ids: Sequence[int], extra: int = 0) -> list[int]:
        if self.llm is None:
            raise ScorerError(f"{self.name}: closed")
        ids = [int(i) for i in ids]
        if not ids:
            raise ScorerError(f"{self.name}: empty row")
        if len(ids) + extra > self.n_ctx:
            more = f" + {extra} new tokens" if extra else ""
            raise ScorerError(f"{self.name}: a row of {len(ids)} tokens{more} exceeds n_ctx={self.n_ctx} "
                              "(pass a larger n_ctx)")
        bad = [i for i in ids if not 0 <= i < self.vocab]
        if bad:
            raise ScorerError(f"{self.name}: token id {bad[0]} outside the vocabulary of {self.vocab}")
        return ids

    def _eval(self, ids: list[int]):
        """Run ``ids`` from an empty cache; the (len(ids), V) float32 logits (a view: valid until the next
        eval)."""
        self.llm.reset()
        try:
            self.llm.eval(ids)
        except Exception as exc:  # noqa: BLE001 - llama_decode's return code as a RuntimeError
            raise ScorerError(f"{self.name}: llama.cpp failed on a row of {len(ids)} tokens: {exc}") from None
        return self.llm.scores[:len(ids)]

    def score(self, rows, starts):
        out = []
        for row, start in zip(rows, starts, strict=True):
            row = self._check(row)
            if not 1 <= start <= len(row):
                raise ScorerError(f"{self.name}: target start {start} outside a row of {len(row)} tokens")
            logits = self._eval(row)
            # position t's logits predict token t + 1
            logprobs = logsoftmax_rows(logits[start - 1:len(row) - 1])
            out.append(Scored(*pick(logprobs, torch.tensor(row[start:], dtype=torch.long))))
        return out

    def distribution(self, ids):
        ids = self._check(ids)
        return logsoftmax_rows(self._eval(ids))

    def generate(self, ids, max_new_tokens, stop):
        ids = self._check(ids, extra=max(int(max_new_tokens) - 1, 0))
        logits = self._eval(ids)
        new: list[int] = []
        while len(new) < max_new_tokens:
            token = int(torch.as_tensor(logits[-1]).argmax())
            new.append(token)
            if stop(new) or len(new) == max_new_tokens:
                break
            try:
                self.llm.eval([token])  # incremental: the cache keeps the prompt
            except Exception as exc:  # noqa: BLE001
                raise ScorerError(f"{self.name}: llama.cpp failed generating token {len(new) + 1}: {exc}") from None
            logits = self.llm.scores[:self.llm.n_tokens]
        return new

    def close(self):
        if self.llm is not None:
            self.llm.close()
            self.llm = None
