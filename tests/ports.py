"""Ports that lack a feature the gate exercises, but compute Gemma right where they run: the gate and the
property suites must report the feature unsupported and judge everything else (and pass them).

* ``Gemma2RejectsPadding``: an HF subclass whose forward raises on a left-padded attention mask, as
  a single-sequence decoder does;
* ``Gemma3NoPositionIds``: a forward that takes no ``position_ids`` (it counts positions itself);
* ``Gemma2RefusesLongPrefill``: the sliding-window cache bug of :mod:`tests.mutants_cache`, in a port
  whose cache also refuses (``NotImplementedError``) a prefill longer than its window: the decode
  property must count those schedules as unsupported and still find the bug in the ones it feeds.

litgpt (a real third-party implementation without a mask input) is ``harness.adapters.litgpt``.
"""

from __future__ import annotations

from transformers import Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3ForConditionalGeneration

from tests.mutants_cache import G2SlidingCacheWrapBug


class Gemma2RejectsPadding(Gemma2ForCausalLM):
    MODEL = "gemma-2-2b-tiny"

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise NotImplementedError("left padding is not supported: run one sequence at a time")
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


class Gemma3MultimodalRejectsPadding(Gemma3ForConditionalGeneration):
    """An image-text port that runs one sequence at a time (no left padding)."""

    MODEL = "gemma-3-4b-mm-tiny"

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise NotImplementedError("left padding is not supported: run one sequence at a time")
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


class Gemma3NoPositionIds(Gemma3ForCausalLM):
    MODEL = "gemma-3-1b-tiny"

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                               use_cache=use_cache)


class Gemma2RefusesLongPrefill(G2SlidingCacheWrapBug):
    def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
        if use_cache and input_ids.shape[1] > self.config.sliding_window:
            raise NotImplementedError(f"a prefill of {input_ids.shape[1]} tokens exceeds the sliding window "
                                      f"({self.config.sliding_window}): feed it in chunks")
        return super().forward(input_ids=input_ids, past_key_values=past_key_values, use_cache=use_cache, **kwargs)
