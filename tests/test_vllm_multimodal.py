"""vLLM's image-text Gemma 3 / Gemma 4 and its Gemma 3n text path against the reference, probe by probe.
Needs vLLM (``tox -e vllm``); skipped elsewhere. Findings (reports/vllm-multimodal.md), pinned here so a
vLLM that changes fails the test:

* Gemma 3 image-text: vLLM runs HF's processor on the gate's own pixels and expands each ``<boi>`` to the
  gate's placeholder run (same prompt ids, checked by the worker); the whole image path (SigLIP tower,
  pooling, projector), ``embed`` and ``merge`` conform, and every layer's attention fails alone: vLLM's
  CPU attention backend has no ``supports_mm_prefix`` (vllm/v1/attention/backend.py: False by default),
  so the image tokens attend causally instead of bidirectionally — confirmed: against a reference with
  causal image tokens vLLM passes at every probe.
* Gemma 4 and Gemma 3n image-text: not run; the harness cannot give vLLM's processor raw images / waveforms,
  and vLLM 0.32's Gemma4Processor import needs torchvision, which this env lacks (its Gemma 3n vision tower
  would need timm too). An error naming that.
* Gemma 3n text: vLLM's ``Gemma3nForCausalLM`` passes ``per_layer_inputs=None`` (gemma3n.py,
  ``Gemma3nForCausalLM.forward``), so ``get_per_layer_inputs`` keeps only the context projection: no
  token-table per-layer embedding and no 1/sqrt(2). Every ``layers.{i}.ple_input`` fails, nothing else
  isolated does.
"""

import pytest

from harness.gate import conform

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

_RESULTS: dict = {}


def _conform(name, dtype):
    if (name, dtype) not in _RESULTS:  # each run starts vLLM once (~20-40 s here); tests share it
        _RESULTS[name, dtype] = conform(name, candidate="vllm", dtype=dtype)
    return _RESULTS[name, dtype]


MEDIA = ("vision.embed", "vision.layers.0.out", "vision.layers.1.out", "vision.post_norm", "vision.pool",
         "vision.proj", "embed", "merge")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemma3_image_path_conforms_and_only_attention_fails(dtype):
    result = _conform("gemma-3-4b-mm-tiny", dtype)
    assert result.error is None, result.error
    probes = {p.name: p for p in result.probes}
    assert not result.unsupported, [p.name for p in result.unsupported]
    for name in MEDIA:  # vLLM's image path and its merge at the gate's placeholders
        assert probes[name].passed, probes[name].note
    failed = {p.name for p in result.probes if not p.passed}
    assert result.first_divergence.name == "layers.0.attn", result.verdict()
    assert failed <= {f"layers.{i}.attn" for i in range(8)} | {"logits"}, sorted(failed)
    assert all(probes[f"layers.{i}.attn"].isolated for i in range(8))  # judged alone on vLLM's own input
    assert result.environment["vllm_prefill_forwards"] == [1, 1]


def test_gemma3_vllm_keeps_image_tokens_causal():
    """The cause, confirmed: against a reference whose image tokens are causal (no bidirectional image
    block), vLLM's Gemma 3 conforms at every probe, attention included."""
    from harness.adapters import ReferenceAdapter

    class CausalImagesReference(ReferenceAdapter):
        name = "reference-with-causal-images"

        def load(self, *args):
            super().load(*args)
            self.model._blocks = lambda ids: None  # no image block: every token causal

    result = conform("gemma-3-4b-mm-tiny", candidate="vllm", dtype="float32", reference=CausalImagesReference())
    assert result.passed, result.verdict()
    assert all(p.isolated for p in result.probes if p.name.endswith(".attn"))


@pytest.mark.parametrize("name, model_class", [("gemma-4-e2b-mm-tiny", "Gemma4ForConditionalGeneration"),
                                               ("gemma-4-31b-mm-tiny", "Gemma4ForConditionalGeneration"),
                                               ("gemma-3n-e2b-mm-tiny", "Gemma3nForConditionalGeneration")])
def test_gemma4_and_gemma3n_image_text_are_reported_unsupported(name, model_class):
    result = conform(name, candidate="vllm", dtype="float32")
    assert result.error is None and result.passed and not result.probes, result.verdict()
    assert result.not_run.startswith(f"the harness cannot give vLLM's {model_class} its media"), result.not_run
    assert result.verdict().startswith(f"UNSUPPORTED {name} [float32]")


def test_gemma3n_text_drops_the_per_layer_embedding():
    result = _conform("gemma-3n-e2b-tiny", "float32")
    assert result.error is None, result.error
    failed = {p.name: p for p in result.probes if not p.passed}
    layers = 10
    assert result.first_divergence.name == "layers.0.ple_input", result.verdict()
    assert set(failed) == {f"layers.{i}.ple_input" for i in range(layers)} | {"logits", "decode"}, sorted(failed)
    first = failed["layers.0.ple_input"]
    assert first.isolated and first.metrics["rel_rms"] > 0.3 and first.metrics["max_rel"] > 1, first.metrics
    assert all(p.passed for p in result.probes if p.name.endswith((".ple", ".altup_correct", ".attn", ".mlp")))
