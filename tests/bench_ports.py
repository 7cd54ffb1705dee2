"""Implementations for the benchmark runner's tests: one without a generation method, one that crashes,
one that hangs, and the reference with a switchable slowdown (for the regression gate)."""

from __future__ import annotations

import os
import time

from harness.adapters.reference import ReferenceAdapter


class NoGenerate:
    """A gate-only port: load() and run(), no bench_generate()."""

    name = "no-generate"

    def load(self, hf_config, state_dict, dtype):
        pass

    def run(self, batch):
        raise NotImplementedError


class CrashesInGenerate(ReferenceAdapter):
    name = "crashes"

    def bench_generate(self, input_ids, steps, on_token):
        raise RuntimeError("kernel launch failed: invalid configuration")


class Hangs(ReferenceAdapter):
    name = "hangs"

    def bench_generate(self, input_ids, steps, on_token):
        time.sleep(3600)


class Reference(ReferenceAdapter):
    """The reference; with GEMMA_TEST_SLOWDOWN=1 every forward and every LM head runs twice (twice the
    work, a real slowdown of the same path, as a regression would be)."""

    name = "reference-under-test"

    def load(self, hf_config, state_dict, dtype):
        super().load(hf_config, state_dict, dtype)
        if os.environ.get("GEMMA_TEST_SLOWDOWN") == "1":
            forward = self.model.forward

            def twice(*args, **kwargs):
                cache = kwargs.get("cache")
                if cache is not None:  # a throwaway copy: the cache must advance once
                    import copy

                    forward(*args, **{**kwargs, "cache": copy.deepcopy(cache)})
                else:
                    forward(*args, **kwargs)
                return forward(*args, **kwargs)

            self.model.forward = twice
            head = self.model.head
            self.model.head = lambda x: (head(x), head(x))[1]
