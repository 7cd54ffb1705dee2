"""vLLM's side of :class:`harness.lmeval.vllm_scorer.VLLMScorer`: one persistent process, one engine.

``python -m harness.lmeval.vllm_worker SETUP.json REPLY_FD`` loads the model directory named in
``SETUP.json`` into ``vllm.LLM`` once, then answers requests: one JSON object per line on stdin, one
JSON reply per line written to file descriptor ``REPLY_FD`` (a pipe of the parent's; stdout and stderr
are vLLM's log, which the parent keeps in a file). Tensors travel as ``torch.save`` files in the
setup's ``out_dir``. Requests (``op``):

``score``  ``{"rows": [[ids]], "starts": [int]}``: every row in one ``llm.generate`` call with
    ``SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)``; reply ``{"logprobs": [[...]],
    "ranks": [[...]]}`` for the positions ``start..len(row)-1`` of each row. vLLM's prompt log-prob of
    token t is ``log_softmax(logits, dtype=float32)`` of position t - 1 gathered at token t (fp32, sent
    as the exact Python float); its rank is the number of vocabulary entries whose log-prob is ``>=``
    the token's, so rank 1 means strictly greatest (a token tied at the top has rank >= 2).
``distribution``  ``{"ids": [ids], "out": path}``: vLLM's own logits tensor for every position of the
    prompt, captured by a forward hook on the model's ``logits_processor`` while prompt log-probs are
    requested (the sampling call gives the last position, the prompt-logprob call the others), turned
    into ``log_softmax(dtype=float32)`` exactly as vLLM's sampler does, and saved as (T, V) fp32. The
    worker checks it against the prompt log-probs vLLM returns in the same call, bit for bit, and fails
    the request if they differ (the hook would then have caught the wrong tensor).
``generate``  ``{"ids": [ids], "max_new_tokens": n}``: greedy (temperature 0, ``ignore_eos``), stepped
    one engine step at a time; after every new token the worker writes ``{"partial": true, "tokens": [the
    new tokens so far]}``, reads ``{"stop": bool}`` back on stdin and aborts the request when told to
    stop. Reply ``{"tokens": [...]}``.
``close``: exit.

A request that fails (vLLM rejects a token id, ...) is answered ``{"error": "Type: message"}`` and the
worker goes on; the parent raises it. EOF on stdin ends the worker.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine (and its model) in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; the 270M in fp32 holds 36 KiB per token


class LogitsCapture:
    """Hooks on vLLM's model: while ``on``, each output (rows, V) of its ``logits_processor`` is kept as
    its fp32 log-softmax, computed at once (the sampler may modify the logits in place later); and the
    token count of every forward of the transformer is recorded (how vLLM batched the rows)."""

    def __init__(self, model):
        import torch

        self.on = False
        self.calls: list = []
        self.forwards: list[int] = []
        self._torch = torch
        self.hooks = [model.logits_processor.register_forward_hook(self._keep),
                      model.model.layers[0].register_forward_pre_hook(self._count, with_kwargs=True)]

    def _keep(self, module, args, logits):
        if self.on:
            self.calls.append(self._torch.log_softmax(logits, dim=-1, dtype=self._torch.float32))

    def _count(self, module, args, kwargs):
        positions = kwargs.get("positions", args[0] if args else None)
        self.forwards.append(int(positions.shape[-1]) if positions is not None else -1)


class Worker:
    def __init__(self, setup: dict, reply):
        self.setup, self.reply = setup, reply
        started = time.perf_counter()
        import torch
        import transformers
        import vllm
        from vllm import LLM
        from vllm.platforms import current_platform

        self.torch = torch
        length = int(setup["max_model_len"])
        self.llm = LLM(model=setup["model_dir"], runner="generate", dtype=setup["dtype"], seed=0,
                       enforce_eager=True, enable_prefix_caching=False, enable_chunked_prefill=False,
                       max_model_len=length, max_num_batched_tokens=length, max_num_seqs=int(setup["max_num_seqs"]),
                       gpu_memory_utilization=float(setup.get("gpu_memory_utilization", 0.3)))
        captures = self.llm.apply_model(LogitsCapture)
        self.capture = captures[0] if isinstance(captures, list) else captures
        if not isinstance(self.capture, LogitsCapture):
            raise RuntimeError("the vLLM model is not in this process (set VLLM_ENABLE_V1_MULTIPROCESSING=0)")
        self.environment = {"vllm": vllm.__version__, "vllm_transformers": transformers.__version__,
                            "vllm_torch": str(torch.__version__), "vllm_device": current_platform.device_type,
                            "engine_start_s": round(time.perf_counter() - started, 2)}
        self.requests = 0

    def send(self, message: dict) -> None:
        self.reply.write(json.dumps(message) + "\n")
        self.reply.flush()

    # ------------------------------------------------------------------ requests

    def _prompts(self, rows):
        from vllm.inputs import TokensPrompt

        return [TokensPrompt(prompt_token_ids=[int(t) for t in row]) for row in rows]

    def score(self, rows: list[list[int]], starts: list[int]) -> dict:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        self.capture.forwards = []
        outs = self.llm.generate(self._prompts(rows), params, use_tqdm=False)
        logprobs, ranks = [], []
        for row, start, out in zip(rows, starts, outs, strict=True):
            positions = out.prompt_logprobs or [None]  # [0] is None: the first token has no prediction
            if len(positions) != len(row):
                raise RuntimeError(f"vLLM returned {len(positions)} prompt log-probs for a row of {len(row)} tokens")
            picked = [positions[t][row[t]] for t in range(start, len(row))]
            logprobs.append([p.logprob for p in picked])
            ranks.append([p.rank for p in picked])
        return {"logprobs": logprobs, "ranks": ranks, "forwards": self.capture.forwards}

    def distribution(self, ids: list[int], out_path: str) -> dict:
        from vllm import SamplingParams

        torch = self.torch
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        self.capture.calls, self.capture.on = [], True
        try:
            out = self.llm.generate(self._prompts([ids]), params, use_tqdm=False)[0]
        finally:
            self.capture.on = False
        calls, self.capture.calls = self.capture.calls, []
        # execute_model computes the sampled position's logits first, the prompt log-probs after (one
        # call for the whole prompt: no chunked prefill); a 1-token prompt has no prompt call.
        shapes = [tuple(c.shape) for c in calls]
        if len(ids) > 1 and (len(calls) != 2 or shapes[0][0] != 1 or shapes[1][0] != len(ids) - 1):
            raise RuntimeError(f"logits_processor called with {shapes} for a prompt of {len(ids)} tokens")
        dist = torch.cat([*calls[1:], calls[0]]) if len(ids) > 1 else calls[0]
        if len(ids) > 1:
            returned = torch.tensor([out.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))])
            captured = dist[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
            if not torch.equal(captured, returned):
                worst = float((captured - returned).abs().max())
                raise RuntimeError(f"captured logits differ from vLLM's prompt log-probs (max |diff| {worst:.3g})")
        if int(dist[-1].argmax()) != out.outputs[0].token_ids[0]:
            raise RuntimeError("the captured last-position logits do not give vLLM's greedy token")
        torch.save(dist.contiguous(), out_path)
        return {"path": out_path, "shape": list(dist.shape)}

    def generate(self, ids: list[int], max_new_tokens: int) -> dict:
        from vllm import SamplingParams

        engine = self.llm.llm_engine
        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        self.requests += 1
        rid = f"generate-{self.requests}"
        engine.add_request(rid, self._prompts([ids])[0], params)
        tokens: list[int] = []
        stopped = False
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id != rid or stopped:
                    continue
                new = list(out.outputs[0].token_ids)
                for k in range(len(tokens) + 1, len(new) + 1):  # one token per step; asked after each
                    tokens = new[:k]
                    self.send({"partial": True, "tokens": tokens})
                    answer = json.loads(sys.stdin.readline() or '{"stop": true}')
                    if answer.get("stop"):
                        stopped = True
                        break
            if stopped and engine.has_unfinished_requests():
                engine.abort_request([rid])
        return {"tokens": tokens}

    # ------------------------------------------------------------------ loop

    def serve(self) -> None:
        self.send({"ready": True, "environment": self.environment})
        for line in sys.stdin:
            request = json.loads(line)
            op = request.get("op")
            if op == "close":
                return
            started = time.perf_counter()
            try:
                if op == "score":
                    result = self.score(request["rows"], request["starts"])
                elif op == "distribution":
                    result = self.distribution(request["ids"], request["out"])
                elif op == "generate":
                    result = self.generate(request["ids"], int(request["max_new_tokens"]))
                else:
                    raise ValueError(f"unknown request {op!r}")
            except Exception as exc:  # noqa: BLE001 - one line back to the parent; the engine goes on
                import traceback

                traceback.print_exc()
                sys.stderr.flush()
                detail = " ".join(str(exc).split())
                result = {"error": f"{type(exc).__name__}: {detail}"[:400]}
            self.send({**result, "seconds": round(time.perf_counter() - started, 4)})


def main(setup_path: str, reply_fd: str) -> None:
    with open(setup_path) as f:
        setup = json.load(f)
    os.set_inheritable(int(reply_fd), False)  # a process vLLM starts must not hold the parent's pipe open
    reply = os.fdopen(int(reply_fd), "w", buffering=1)
    Worker(setup, reply).serve()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
