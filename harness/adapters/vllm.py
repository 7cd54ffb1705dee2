"""vLLM as an implementation under test, one isolated process per model.

``load`` writes the model as an HF checkpoint directory with its own offline tokenizer
(:mod:`harness.model_dir`); ``run`` starts :mod:`harness.adapters.vllm_worker` in a child process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, eager, prefix caching off), which captures the probes with
forward hooks on vLLM's own model object and asks for full-vocabulary prompt log-probabilities and a
greedy continuation. A crash, a hang (``timeout_s``) or an architecture vLLM does not know becomes an
:class:`AdapterError` naming it, so the gate records it as that run's result and goes on.

What differs from the other adapters, and is reported as such:

* vLLM takes unpadded prompts: each row of the batch is sent without its left padding (the gate only
  compares real tokens, whose positions are the same);
* ``logits`` are vLLM's log-probabilities (``logits_form = "logprobs"``): the gate compares them with
  the reference's log-softmax;
* vLLM's CPU attention supports head sizes 32, 64, 80, ... only, so :meth:`prepare_config` doubles
  the head dims of a twin until they reach 32 (the twins use 16), and its CPU MoE kernel needs a
  hidden size divisible by 32; the result says so;
* ``prefill_chunk=N`` makes vLLM prefill N tokens per forward (chunked prefill), so the probes and
  log-probs of later chunks come through vLLM's KV cache: a cache property, judged probe by probe.

The worker's interpreter is this one, or ``$GEMMA_HARNESS_VLLM_PYTHON`` (a venv with vLLM and the
transformers version it needs, while this process keeps another).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..decode_check import DECODE_STEPS
from ..model_dir import write_model_dir, write_processor_config
from ..probes import is_media
from ..synthetic import Batch
from .base import Adapter, AdapterError, Unsupported, last_error_line

HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM CPU attention's supported sizes
MIN_HEAD_DIM = HEAD_SIZES[0]
MOE_HIDDEN_ALIGNMENT = 32  # vLLM CPU MoE experts: hidden size divisible by 32 (CPUExpertsBase.output_alignment)
REPO_ROOT = Path(__file__).resolve().parents[2]


def _tower_head(vision: Mapping) -> int | str:
    if vision.get("head_dim"):
        return int(vision["head_dim"])
    heads = vision.get("num_attention_heads")
    return vision["hidden_size"] // heads if heads and vision.get("hidden_size") else "?"


def _media(batch: Batch) -> list[dict] | None:
    """Per row, what the worker hands vLLM besides the prompt ids: the row's images (Gemma 3: the gate's
    already-processed (3, S, S) pixels as (S, S, 3) float32 arrays, which the model directory's processor
    config passes through unchanged), or None for a text batch."""
    if batch.pixel_values is None and batch.audio_features is None:
        return None
    rows = []
    for row in range(batch.input_ids.shape[0]):
        item = {}
        if batch.pixel_values is not None:
            keep = batch.image_rows == row
            pixels = batch.pixel_values[keep]  # Gemma 3: (I, 3, S, S) images; Gemma 4: (I, P, 3 * p * p) patches
            item["images"] = [p.permute(1, 2, 0).float().contiguous() if p.dim() == 3 else p.float() for p in pixels]
            if batch.image_position_ids is not None:
                item["image_position_ids"] = [p for p in batch.image_position_ids[keep]]
        if batch.audio_features is not None:
            keep = batch.audio_rows == row
            item["audio_features"] = [f for f in batch.audio_features[keep]]
        rows.append(item)
    return rows


class VLLMAdapter(Adapter):
    name = "vllm"
    logits_form = "logprobs"

    def __init__(self, decode_steps: int = DECODE_STEPS, timeout_s: float = 600.0, python: str | None = None,
                 prefill_chunk: int | None = None):
        self.decode_steps, self.timeout_s, self.prefill_chunk = decode_steps, timeout_s, prefill_chunk
        self.python = python or os.environ.get("GEMMA_HARNESS_VLLM_PYTHON") or sys.executable
        self.unsupported: dict[str, str] = {}
        self.environment: dict = {}
        self.config_note = ""
        self._dir: Path | None = None
        self._greedy: tuple[Batch, int, list] | None = None

    def prepare_config(self, hf_config: Mapping) -> dict:
        """The twin with its head dims doubled (all by the same factor) until the smallest reaches 32, each
        rounded up to a size vLLM's CPU attention has, and (MoE) the hidden size rounded up to a multiple
        of 32. Noted in the result."""
        full = dict(hf_config)
        # an image-text model: the text model's geometry is in text_config (the towers' attention is vLLM's
        # MM-encoder attention, torch SDPA on CPU, which takes their head sizes as they are)
        config = dict(full["text_config"]) if isinstance(full.get("text_config"), Mapping) else full
        notes = []
        keys = [key for key in ("head_dim", "global_head_dim") if config.get(key)]
        factor = 1  # one factor for every head geometry, so Gemma 4's local and global sizes stay distinct
        while keys and min(config[key] for key in keys) * factor < MIN_HEAD_DIM:
            factor *= 2
        for key in keys:
            old = config[key]
            new = min((size for size in HEAD_SIZES if size >= old * factor), default=old * factor)
            if new != old:
                config[key] = new
                notes.append(f"{key} {old}->{new}")
        why = [f"vLLM CPU attention has head sizes {', '.join(map(str, HEAD_SIZES[:3]))}, ..."] if notes else []
        hidden = config.get("hidden_size", 0)
        if config.get("enable_moe_block") and hidden % MOE_HIDDEN_ALIGNMENT:
            config["hidden_size"] = hidden + MOE_HIDDEN_ALIGNMENT - hidden % MOE_HIDDEN_ALIGNMENT
            notes.append(f"hidden_size {hidden}->{config['hidden_size']}")
            why.append(f"its CPU MoE kernel needs hidden % {MOE_HIDDEN_ALIGNMENT} == 0")
        self.config_note = f"{', '.join(notes)} ({'; '.join(why)})" if notes else ""
        if self.prefill_chunk:
            self.config_note += f"; vLLM prefills {self.prefill_chunk} tokens per forward (chunked prefill)"
        if config is not full:
            full["text_config"] = config
            self.config_note += ("; vision tower unchanged (head size "
                                 f"{_tower_head(full.get('vision_config') or {})}: vLLM's CPU MM-encoder attention is "
                                 "torch SDPA, any head size)") if full.get("vision_config") else ""
        return full

    def load(self, hf_config: Mapping, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
        self.close()
        self._dir = Path(tempfile.mkdtemp(prefix="gemma-harness-vllm-"))
        self.dtype = str(dtype).removeprefix("torch.")
        if hf_config.get("model_type") == "gemma3":  # the published checkpoints' SigLIP layout, which vLLM loads
            tower = "model.vision_tower."
            state_dict = {tower + "vision_model." + k.removeprefix(tower)
                          if k.startswith(tower) and not k.startswith(tower + "vision_model.") else k: v
                          for k, v in state_dict.items()}
        write_model_dir(self._dir / "model", hf_config, state_dict, torch.float32)
        write_processor_config(self._dir / "model", hf_config)
        self._greedy = None

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __del__(self):
        self.close()

    def _call(self, batch: Batch, decode_steps: int) -> dict:
        if self._dir is None:
            raise AdapterError("vllm: run() before load()")
        out = self._dir / "out.pt"
        out.unlink(missing_ok=True)
        request = {"model_dir": str(self._dir / "model"), "dtype": self.dtype, "prompts": batch.prompts(),
                   "decode_steps": decode_steps, "prefill_chunk": self.prefill_chunk, "out": str(out), "media": None}
        media = _media(batch)
        if media is not None:
            request["media"] = str(self._dir / "media.pt")
            torch.save(media, request["media"])
        (self._dir / "request.json").write_text(json.dumps(request))
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        cmd = [self.python, "-m", "harness.adapters.vllm_worker", str(self._dir / "request.json")]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise AdapterError(f"vllm: no result after {self.timeout_s:.0f} s (killed)") from None
        if proc.returncode != 0 or not out.exists():
            how = f"exit code {proc.returncode}" if proc.returncode >= 0 else f"killed by signal {-proc.returncode}"
            line = last_error_line(stderr)
            if "Unsupported: " in line:  # the worker's declaration that vLLM cannot run this model as given
                raise Unsupported("model", line.split("Unsupported: ", 1)[1])
            raise AdapterError(f"vllm failed ({how}): {line}")
        data = torch.load(out, weights_only=True)
        self.environment = {**data["environment"], **{k: round(v, 2) for k, v in data["timings"].items()}}
        return data

    def run(self, batch: Batch) -> dict[str, torch.Tensor]:
        # the gate judges no greedy decode on a batch with media (its check feeds the reference's cached decode
        # text only): vLLM need not generate there
        steps = 0 if batch.media else self.decode_steps
        data = self._call(batch, steps)
        rows = data["rows"]
        self.environment["vllm_prefill_forwards"] = [r["prefill_calls"] for r in rows]
        self._greedy = (batch, steps, self._continuations(rows) if steps else [])
        return self._assemble(batch, [r["probes"] for r in rows])

    def generate(self, batch: Batch, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Greedy continuation of each row: (tokens (steps,), full-vocabulary log-probs (steps, V))."""
        cached = self._greedy
        if cached is None or cached[0] is not batch or cached[1] < steps:
            cached = (batch, steps, self._continuations(self._call(batch, steps)["rows"]))
            self._greedy = cached
        return [(tokens[:steps], logprobs[:steps]) for tokens, logprobs in cached[2]]

    @staticmethod
    def _continuations(rows: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(r["greedy_tokens"], r["greedy_logprobs"]) for r in rows]

    @staticmethod
    def _assemble(batch: Batch, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per-row (tokens, ...) probes back into (batch, tokens, ...) at the real positions (zeros elsewhere)."""
        b, t = batch.input_ids.shape
        out = {}
        for name in rows[0]:
            if is_media(name):  # (items, tokens, ...) per row, rows in order: the batch's item order
                out[name] = torch.cat([probes[name] for probes in rows if name in probes])
                continue
            full = torch.zeros(b, t, *rows[0][name].shape[1:])
            for r, probes in enumerate(rows):
                full[r, batch.attention_mask[r].bool()] = probes[name]
            out[name] = full
        return out

