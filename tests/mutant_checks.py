"""What the mutation suites require of the gate for every mutant: caught, at the probe it names, with a
verdict that says what kind of operation is wrong."""

from __future__ import annotations

from harness.gate import conform
from harness.probes import SUBLAYERS, is_media, locate

# what the verdict says, by the kind of the first failing probe: a sublayer wrong on its own input, or
# the operations between two probes
BLAME = {kind: "computes wrongly on the right input" for kind in SUBLAYERS} | {
    f"{kind}_input": "input is wrong: the bug is between" for kind in SUBLAYERS} | {
    "out": "the bug is between", "logits": "the bug is between", "embed": "the embedding is wrong",
    "merge": "the bug is between", "vision.embed": "the patch embedding is wrong",
    # Gemma 3n (harness.gemma3n_probes): the AltUp stream operations lie between two probes; LAuReL is a
    # branch computed on its input (the pre-attention norm's output)
    "altup_streams": "the bug is between", "altup_predict": "the bug is between",
    "altup_correct": "the bug is between", "laurel": "computes wrongly on the right input"}


def _blame(kind: str) -> str:
    """What the verdict says for a first failing probe of this kind (image-path probes: between two probes)."""
    return BLAME.get(kind) or ("the bug is between" if is_media(kind) else BLAME[kind])


def explain(result) -> str:
    first = result.first_divergence
    where = f"first divergence {first.name}: {first.note}" if first else "no divergence"
    return f"{result.verdict()} | {where}"


def check_caught(cls, dtype: str) -> None:
    """``cls`` (a mutant with MODEL, EXPECTED, BUG) fails the gate in ``dtype`` first at EXPECTED, blamed right."""
    result = conform(cls.MODEL, candidate=cls, dtype=dtype)
    assert result.error is None, result.error
    assert not result.passed, f"{cls.__name__} ({cls.BUG}) was not caught: {result.verdict()}"
    first = result.first_divergence
    assert first.status == "fail", explain(result)
    assert first.name == cls.EXPECTED, f"{cls.__name__}: expected {cls.EXPECTED}, {explain(result)}"
    assert (first.layer, first.sublayer) == locate(cls.EXPECTED)
    assert _blame(first.sublayer) in first.note, explain(result)  # the verdict names the kind of wrong operation
