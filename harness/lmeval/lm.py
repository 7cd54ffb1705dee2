"""The lm-eval model ``gemma-harness``: lm-eval's three request types through any implementation the
harness drives.

    lm_eval --model gemma-harness --model_args impl=reference,model=gemma-3-270m --tasks arc_easy \\
        --include_path "$(gemma-harness eval --task-dir)"

or, in Python, ``lm_eval.simple_evaluate(model="gemma-harness", model_args="impl=hf,model=gemma-3-270m")``
after ``import harness.lmeval.lm``. ``model_args``: ``impl`` (reference, hf, hf-sdpa, vllm, llamacpp,
llamacpp-f32 or MODULE:OBJECT), ``model`` (``gemma-3-270m``, the real weights, or a config name for a
random-weight model), ``dtype`` (float32), ``seed`` (random weights), ``max_length``, ``device``
(``cuda:0``: the reference and HF run there).

Every request is tokenized here with the model's own tokenizer and starts with exactly one BOS: the
pre-flight (:mod:`harness.lmeval.preflight`) checks each batch of token ids before it is scored and stops
the run naming the offending ids. With lm-eval's ``--apply_chat_template`` the conversation is rendered by
the harness (:func:`harness.lmeval.preflight.render_chat`), BOS included, and is not given a second one.

Requests are scored longest first in batches of ``batch_size``; the scorers make a row's numbers
independent of its batch (see :mod:`harness.lmeval.scorers`), so batch size never changes a score.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import lm_eval.models  # noqa: F401 - lm-eval's own models first: a registry already holding ours would skip them
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from .scorers import Scorer, ScorerError, build_scorer, load_model

NAME = "gemma-harness"
DEFAULT_MAX_LENGTH = 4096


@register_model(NAME)
class GemmaHarnessLM(TemplateLM):
    backend = "causal"

    def __init__(self, impl: str = "reference", model: str = "gemma-3-270m", dtype: str = "float32",
                 batch_size: int | str = 8, max_length: int | None = None, seed: int = 0,
                 device: str | None = None, scorer: Scorer | None = None, loaded=None, **_lm_eval_extras):
        super().__init__()
        if str(batch_size).startswith("auto"):
            raise ScorerError("batch_size=auto is not supported: give a number (scores do not depend on it)")
        self.batch_size = int(batch_size)
        self.impl, self.model_name, self.dtype = impl, model, dtype
        self.loaded = loaded or load_model(model, seed)
        self.tokens = self.loaded.tokens
        if str(device).startswith("cuda") and not torch.cuda.is_available():  # lm-eval's default: as its HF model
            logging.getLogger(__name__).warning("gemma-harness: CUDA is not available, running on the CPU")
            device = "cpu"
        self.scorer = scorer or build_scorer(impl, self.loaded, getattr(torch, dtype), device=device or "cpu")
        self.max_length = int(max_length or min(DEFAULT_MAX_LENGTH, self.loaded.hf_config.get(
            "max_position_embeddings", DEFAULT_MAX_LENGTH)))
        self.chat = False  # set when lm-eval renders a chat template through apply_chat_template
        self.first_ids: list[int] | None = None  # the first request's ids, for the records
        self.truncated = 0  # requests cut to max_length (BOS kept)

    # ------------------------------------------------------------------ tokenizer side

    @property
    def eot_token_id(self) -> int:
        return self.tokens.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokens.bos_id  # an empty context is conditioned on BOS, never on EOS

    @property
    def tokenizer_name(self) -> str:
        return f"{self.model_name}-{'gguf' if self.loaded.meta else 'bytes'}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Ids of ``string``, with one BOS unless ``add_special_tokens=False``; a rendered chat (which
        starts with the BOS text) has its special tokens parsed and gets no second BOS."""
        if self.chat and string.startswith(self.tokens.bos_text):
            return self.tokens.encode(string, parse_special=True)
        ids = self.tokens.encode(string, parse_special=self.chat)
        return ids if add_special_tokens is False else [self.tokens.bos_id, *ids]

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokens.decode(ids)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        from .preflight import render_chat

        self.chat = True
        return render_chat(chat_history, self.loaded.generation, add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        return f"harness-rendered gemma {self.loaded.generation} chat format"

    # ------------------------------------------------------------------ scoring

    def _fit(self, ids: list[int], room: int = 0) -> list[int]:
        """Left-truncate to max_length - room tokens, keeping the BOS in front."""
        limit = self.max_length - room
        if len(ids) <= limit:
            return ids
        self.truncated += 1
        return [ids[0], *ids[len(ids) - limit + 1:]]

    def _preflight(self, rows: Sequence[Sequence[int]], labels: Sequence[str]) -> None:
        from .preflight import check_bos

        check_bos(rows, self.tokens.bos_id, labels)
        if self.first_ids is None and rows:
            self.first_ids = list(rows[0][:8])

    def _score_all(self, rows: list[list[int]], starts: list[int], desc: str, disable_tqdm: bool) -> list:
        """Score every row, longest first in batches; results in the input order."""
        self._preflight(rows, [f"request {i}" for i in range(len(rows))])
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
        out: list = [None] * len(rows)
        with tqdm(total=len(rows), desc=f"{desc} ({self.scorer.name})", disable=disable_tqdm) as bar:
            for k in range(0, len(order), self.batch_size):
                chunk = order[k:k + self.batch_size]
                for i, scored in zip(chunk, self.scorer.score([rows[i] for i in chunk], [starts[i] for i in chunk]),
                                     strict=True):
                    out[i] = scored
                bar.update(len(chunk))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows, starts = [], []
        for _, context, continuation in requests:
            if not continuation:
                raise ScorerError("a loglikelihood request with an empty continuation")
            row = self._fit(list(context) + list(continuation))
            rows.append(row)
            starts.append(len(row) - len(continuation))
        scored = self._score_all(rows, starts, "loglikelihood", disable_tqdm)
        return [(s.total, all(s.greedy)) for s in scored]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood in lm-eval's disjoint rolling windows (``lm_eval.utils``: each window
        after the first is conditioned on one token of context), each window given a BOS in front, so a
        window holds at most max_length tokens: BOS, one context token, max_length - 2 targets."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        rows, starts, owner = [], [], []
        for n, (string,) in enumerate(req.args for req in requests):
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False), prefix_token=self.tokens.bos_id,
                max_seq_len=self.max_length - 2, context_len=1))
            for context, target in windows:
                prefix = context if context[:1] == [self.tokens.bos_id] else [self.tokens.bos_id, *context]
                rows.append(prefix + target)
                starts.append(len(prefix))
                owner.append(n)
        scored = self._score_all(rows, starts, "loglikelihood_rolling", disable_tqdm)
        totals = [0.0] * len(requests)
        for n, s in zip(owner, scored, strict=True):
            totals[n] += s.total
        return totals

    def _stopper(self, until: list[str]) -> Callable[[list[int]], bool]:
        stop_ids = self.tokens.stop_ids

        def stop(new: list[int]) -> bool:
            return new[-1] in stop_ids or any(u in self.tok_decode(new) for u in until)

        return stop

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation (lm-eval's ``do_sample``/``temperature`` are refused if they ask for
        sampling) until a stop string, a stop token or ``max_gen_toks``."""
        prompts, settings = [], []
        for context, kwargs in (req.args for req in requests):
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0) or 0) > 0:
                raise ScorerError("generate_until with sampling: the harness generates greedily only")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            room = int(kwargs.get("max_gen_toks", 256))
            prompts.append(self._fit(self.tok_encode(context), room))
            settings.append((until, room))
        self._preflight(prompts, [f"request {i}" for i in range(len(prompts))])
        out = []
        for ids, (until, room) in tqdm(list(zip(prompts, settings, strict=True)),
                                       desc=f"generate_until ({self.scorer.name})", disable=disable_tqdm):
            new = self.scorer.generate(ids, room, self._stopper(until))
            if new and new[-1] in self.tokens.stop_ids:
                new = new[:-1]
            text = self.tok_decode(new)
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out

    def close(self) -> None:
        self.scorer.close()
