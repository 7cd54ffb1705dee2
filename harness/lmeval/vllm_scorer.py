"""vLLM as a scorer: one persistent worker process (:mod:`harness.lmeval.vllm_worker`) holding one engine.

The model is written as an HF checkpoint directory (its state dict in fp32: for the real 270M, the
dequantized GGUF weights every other scorer uses, so what differs is the implementation, not the
numbers it starts from) and loaded by ``vllm.LLM`` once per scorer, in the interpreter given by
``python``, ``$GEMMA_HARNESS_VLLM_PYTHON``, ``<repo>/.tox/vllm/bin/python`` or this one (vLLM pins its
own transformers). The engine runs in the worker's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
eager, without prefix caching or chunked prefill (a prompt is prefilled in one forward).

Requests go to the worker's stdin as JSON lines; replies come back on a pipe of their own (vLLM's
log goes to a file, so nothing it prints can be taken for a reply); tensors come as ``torch.save``
files. A reply that does not come within ``timeout_s`` kills the worker; a worker that dies, or a
request vLLM refuses, is a one-line :class:`ScorerError` (the last error line of the worker's log).

What the numbers are:

* ``score``: vLLM's prompt log-probs (``prompt_logprobs=0``): ``log_softmax(logits, dtype=float32)`` of
  the previous position, gathered at the token; fp32 from vLLM, passed as exact Python floats. Greedy
  is vLLM's rank 1: no other vocabulary entry has a log-prob ``>=`` the token's (the torch scorers'
  ``argmax`` takes the first of tied maxima; the two differ only at an exact fp32 tie at the top).
* ``distribution``: vLLM's own logits tensor, caught by a hook on the model's ``logits_processor``
  while prompt log-probs are asked for, log-softmaxed in fp32 as vLLM does; the worker checks it bit
  for bit against the prompt log-probs vLLM returns in the same call.
* ``generate``: greedy, ``ignore_eos``; the engine is stepped one token at a time and ``stop`` is asked
  after every token (a round trip per token), so ``stop`` alone ends a continuation, as for the others.

Batching: vLLM flattens the prompts of one engine step into one token list, so the linear layers run on
a row count that depends on the batch. ``max_num_seqs`` (default 1) is how many rows vLLM may put in one
step: with 1 every row is prefilled alone whatever ``score`` is given, and ``batch_invariant`` holds by
construction; with more it is what :data:`BATCH_INVARIANT_MEASURED` says
(``tests/test_lmeval_vllm.py`` measures it).

vLLM's CPU attention runs head sizes 32, 64, 80, ... only: a model with another head size (the
random-weight test models use 16) is refused rather than changed, since a changed model's scores would
not be that model's.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch

from ..adapters.base import last_error_line
from ..adapters.vllm import HEAD_SIZES, MOE_HIDDEN_ALIGNMENT
from ..bench.runner import _die_with_parent, python_for
from ..model_dir import write_model_dir
from .scorers import LoadedModel, Scored, Scorer, ScorerError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MAX_MODEL_LEN = 8192
# Whether a row's score is the same alone and among 8 rows in one vLLM engine step (max_num_seqs > 1),
# as measured by tests/test_lmeval_vllm.py on the real 270M, vLLM 0.32.0 CPU, fp32.
BATCH_INVARIANT_MEASURED = False


def vllm_python(python: str | None = None) -> str:
    """The interpreter the worker runs in: ``python``, else the benchmark runner's choice for vLLM
    (``$GEMMA_HARNESS_VLLM_PYTHON``, the repo's ``.tox/vllm`` env, or this one)."""
    return python or python_for("vllm")


def unsupported_geometry(hf_config) -> str | None:
    """Why vLLM's CPU kernels cannot run this model as it is, or None."""
    for key in ("head_dim", "global_head_dim"):
        size = hf_config.get(key)
        if size and size not in HEAD_SIZES:
            return (f"vLLM's CPU attention cannot run head size {size} ({key}; it has "
                    f"{', '.join(map(str, HEAD_SIZES))}): this model cannot be scored by vLLM unchanged")
    hidden = hf_config.get("hidden_size", 0)
    if hf_config.get("enable_moe_block") and hidden % MOE_HIDDEN_ALIGNMENT:
        return (f"vLLM's CPU MoE kernel needs a hidden size divisible by {MOE_HIDDEN_ALIGNMENT} (this model has "
                f"{hidden}): this model cannot be scored by vLLM unchanged")
    return None


def _shutdown(proc: subprocess.Popen, folder: str, grace_s: float = 30.0) -> None:
    """Ask the worker to exit, kill its process group if it does not, remove the folder."""
    if proc.poll() is None:
        try:
            proc.stdin.write('{"op": "close"}\n')
            proc.stdin.flush()
            proc.wait(timeout=grace_s)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    try:
        proc.stdin.close()
    except (OSError, ValueError):
        pass
    shutil.rmtree(folder, ignore_errors=True)


class VLLMScorer(Scorer):
    name = "vllm"

    def __init__(self, model: LoadedModel, dtype: torch.dtype = torch.float32, python: str | None = None,
                 timeout_s: float = 900, max_model_len: int | None = None, max_num_seqs: int = 1,
                 kv_cache_gib: float = 2.0):
        super().__init__()
        # the engine's own KV space, whatever this process's environment says (another vLLM user in the
        # same process, e.g. kv-measure, may have set VLLM_CPU_KVCACHE_SPACE for a much larger model):
        # the 270M in fp32 holds 36 KiB per token, so 2 GiB is ~58k tokens
        self.kv_cache_gib = float(kv_cache_gib)
        why = unsupported_geometry(model.hf_config)
        if why:
            raise ScorerError(f"vllm: {model.name}: {why}")
        self.timeout_s = timeout_s
        self.vocab = int(model.hf_config["vocab_size"])
        self.max_model_len = int(max_model_len or min(DEFAULT_MAX_MODEL_LEN,
                                                      model.hf_config.get("max_position_embeddings", 8192)))
        self.max_num_seqs = int(max_num_seqs)
        self.batch_invariant = self.max_num_seqs == 1 or BATCH_INVARIANT_MEASURED
        self._proc: subprocess.Popen | None = None
        self._dead: str | None = None
        self.last_forwards: list[int] = []
        self._buffer = b""
        self._dir = tempfile.mkdtemp(prefix="gemma-harness-vllm-scorer-")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._dir, True)
        self._log = Path(self._dir) / "worker.log"
        write_model_dir(Path(self._dir) / "model", model.hf_config, model.state, torch.float32)
        self._start(dtype, vllm_python(python))

    # ------------------------------------------------------------------ the worker

    def _start(self, dtype: torch.dtype, python: str) -> None:
        setup = {"model_dir": str(Path(self._dir) / "model"), "dtype": str(dtype).removeprefix("torch."),
                 "max_model_len": self.max_model_len, "max_num_seqs": self.max_num_seqs}
        (Path(self._dir) / "setup.json").write_text(json.dumps(setup))
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": f"{self.kv_cache_gib:g}",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        read_end, write_end = os.pipe()
        started = time.perf_counter()
        try:
            with open(self._log, "wb") as log:
                self._proc = subprocess.Popen(
                    [python, "-m", "harness.lmeval.vllm_worker", str(Path(self._dir) / "setup.json"), str(write_end)],
                    stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO_ROOT,
                    pass_fds=(write_end,), start_new_session=True,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        except OSError as exc:
            os.close(read_end)
            raise ScorerError(f"vllm: cannot start the worker with {python}: {exc}") from None
        finally:
            os.close(write_end)
        self._reply = read_end
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _shutdown, self._proc, self._dir)
        try:
            ready = self._receive()
        except ScorerError:
            self.close()
            raise
        self.environment = {"impl": "vllm", **ready["environment"], "dtype": setup["dtype"],
                            "max_num_seqs": self.max_num_seqs, "max_model_len": self.max_model_len,
                            "kv_cache_gib": self.kv_cache_gib,
                            "python": python, "engine_start_wall_s": round(time.perf_counter() - started, 2)}

    def _fail(self, what: str) -> ScorerError:
        """The worker is gone (or must go): kill it, and the error naming why."""
        proc = self._proc
        killed = proc is not None and proc.poll() is None
        if killed:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        code = proc.returncode if proc is not None else None
        how = ("" if code is None or killed else f" (exit code {code})" if code >= 0 else f" (killed by signal {-code})")
        tail = self._log.read_text(errors="replace")[-20000:] if self._log.exists() else ""
        self._dead = f"vllm worker {what}{how}: {last_error_line(tail)}"
        return ScorerError(self._dead)

    def _receive(self) -> dict:
        deadline = time.monotonic() + self.timeout_s
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(f"gave no answer within {self.timeout_s:.0f} s (killed)")
            ready, _, _ = select.select([self._reply], [], [], min(left, 5.0))
            if not ready:
                continue
            chunk = os.read(self._reply, 1 << 20)
            if not chunk:
                self._proc.wait()
                raise self._fail("died")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = json.loads(line)
        if "error" in message:
            raise ScorerError(f"vllm: {message['error']}")
        return message

    def _send(self, message: dict) -> None:
        if self._dead:
            raise ScorerError(self._dead)
        if self._proc is None:
            raise ScorerError("vllm: the scorer is closed")
        try:
            self._proc.stdin.write(json.dumps(message) + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._fail("died") from None

    def _call(self, message: dict) -> dict:
        self._send(message)
        return self._receive()

    # ------------------------------------------------------------------ the scorer

    def _check(self, lengths) -> None:
        for length in lengths:
            if length > self.max_model_len:
                raise ScorerError(f"vllm: a row of {length} tokens is longer than max_model_len "
                                  f"{self.max_model_len} (VLLMScorer(max_model_len=...))")

    def score(self, rows, starts):
        for row, start in zip(rows, starts, strict=True):
            if not 1 <= start <= len(row):
                raise ScorerError(f"{self.name}: target start {start} outside a row of {len(row)} tokens")
        self._check(map(len, rows))
        if not rows:
            return []
        reply = self._call({"op": "score", "rows": [list(map(int, r)) for r in rows], "starts": list(starts)})
        self.last_forwards = reply["forwards"]  # tokens per transformer forward: how vLLM batched the rows
        return [Scored(list(lp), [rank == 1 for rank in ranks])
                for lp, ranks in zip(reply["logprobs"], reply["ranks"], strict=True)]

    def distribution(self, ids):
        self._check([len(ids)])
        out = Path(self._dir) / "distribution.pt"
        out.unlink(missing_ok=True)
        self._call({"op": "distribution", "ids": list(map(int, ids)), "out": str(out)})
        try:
            return torch.load(out, weights_only=True)
        finally:
            out.unlink(missing_ok=True)

    def generate(self, ids, max_new_tokens, stop):
        if max_new_tokens <= 0:
            return []
        self._check([len(ids) + max_new_tokens])
        self._send({"op": "generate", "ids": list(map(int, ids)), "max_new_tokens": int(max_new_tokens)})
        failed: BaseException | None = None
        while True:
            message = self._receive()
            if not message.get("partial"):
                if failed is not None:
                    raise failed
                return list(message["tokens"])
            try:
                done = failed is not None or bool(stop(list(message["tokens"])))
            except BaseException as exc:  # the worker waits for an answer: stop it, then raise
                failed, done = exc, True
            self._send({"stop": done})

    def close(self) -> None:
        self._finalizer()  # at most once: close(), garbage collection or interpreter exit
        if self._proc is not None:
            try:
                os.close(self._reply)
            except OSError:
                pass
            self._proc = None
