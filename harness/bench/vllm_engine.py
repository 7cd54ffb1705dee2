"""vLLM as a benchmark implementation, in the cell's own process (the runner starts vllm cells with
vLLM's interpreter): the offline engine, requests added together and stepped one engine step at a
time, so every step's tokens are timestamped as they appear (the same clock as the other
implementations, with no HTTP server in between).

Greedy, ``ignore_eos``, ``min_tokens = max_tokens = G``; prefix caching off (every repetition
prefills for real). ``options`` of the cell go to ``vllm.LLM`` (``tensor_parallel_size``,
``pipeline_parallel_size``, ``gpu_memory_utilization``, ``enforce_eager``, ...). The KV figure is
what vLLM's block pool holds for the requests: per KV-cache group, its blocks x its page size x its layers.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile

import torch

from ..adapters.base import Adapter, Unsupported
from ..model_dir import write_model_dir

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: its steps are ours
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache on the CPU backend


class VLLMBenchAdapter(Adapter):
    name = "vllm"

    def __init__(self, max_model_len: int = 4096, max_num_seqs: int = 256, **llm_options):
        self.max_model_len, self.max_num_seqs, self.llm_options = max_model_len, max_num_seqs, llm_options
        self._ids = itertools.count()
        self._kv_bytes = None

    @property
    def version(self) -> str:
        import vllm

        return f"vllm-{vllm.__version__}"

    def load(self, hf_config, state_dict, dtype: torch.dtype) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:
            raise Unsupported("implementation", "vLLM is not installed in this interpreter (tox -e vllm, or set "
                                                "GEMMA_HARNESS_VLLM_PYTHON)") from exc
        self._layers = hf_config["num_hidden_layers"]
        self._dir = tempfile.mkdtemp(prefix="gemma-bench-vllm-")
        write_model_dir(self._dir, hf_config, state_dict, dtype)
        gpu = torch.cuda.is_available()
        # on the CPU backend the "gpu" memory fraction is of the machine's RAM: reserve little
        options = {"enforce_eager": not gpu, "gpu_memory_utilization": 0.85 if gpu else 0.3, **self.llm_options}
        self.llm = LLM(model=self._dir, dtype=str(dtype).removeprefix("torch."), enable_prefix_caching=False,
                       max_model_len=self.max_model_len, max_num_seqs=self.max_num_seqs, seed=0,
                       max_num_batched_tokens=max(self.max_model_len, 2048) * self.max_num_seqs, **options)

    def to_device(self, device: str) -> None:
        if not torch.cuda.is_available():
            raise Unsupported("device", f"this vLLM build runs on the CPU, not {device}")

    def _scheduler(self):
        try:
            return self.llm.llm_engine.engine_core.engine_core.scheduler  # in-process engine (v1)
        except AttributeError:
            return None

    def _kv_bytes_held(self) -> int | None:
        """Bytes of K/V the live requests hold: per KV-cache group, its blocks x its page size x its layers
        (:func:`harness.kvmeasure.vllm_bytes_per_layer`). Counting pool blocks in use x the bytes of a block
        across every tensor instead would count each block once per group of a hybrid model."""
        from ..kvmeasure import vllm_blocks_held, vllm_bytes_per_layer

        scheduler = self._scheduler()
        try:
            held = vllm_blocks_held(scheduler)
            return sum(vllm_bytes_per_layer(scheduler.kv_cache_config, held, self._layers))
        except AttributeError:
            return None

    @torch.no_grad()
    def bench_generate(self, input_ids: torch.Tensor, steps: int, on_token) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        engine = self.llm.llm_engine
        # A request frees its blocks in the step that finishes it, so the cache after a prefill is only
        # visible if it goes on: for steps == 1 a second token is asked for, after the timed one.
        asked = max(steps, 2)
        params = SamplingParams(max_tokens=asked, min_tokens=asked, ignore_eos=True, temperature=0.0)
        rows = input_ids.tolist()
        ids = [f"bench-{next(self._ids)}" for _ in rows]
        for rid, row in zip(ids, rows, strict=True):
            engine.add_request(rid, TokensPrompt(prompt_token_ids=row), params)
        produced = dict.fromkeys(ids, 0)
        reported = 0
        held = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id in produced:
                    produced[out.request_id] = len(out.outputs[0].token_ids)
            if min(produced.values()) < asked:
                held = self._kv_bytes_held()  # the last step frees the requests' blocks: read before it
            while reported < min(min(produced.values()), steps):  # every request has its next token
                reported += 1
                on_token(torch.tensor([reported]))
        self._kv_bytes = held

    def cache_bytes(self) -> int | None:
        return self._kv_bytes

    def close(self) -> None:
        shutil.rmtree(getattr(self, "_dir", ""), ignore_errors=True)
