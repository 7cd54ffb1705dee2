"""The conformance gate: one model, a reference and a candidate implementation, every probe compared."""

from __future__ import annotations

import platform
import time
import traceback
from dataclasses import dataclass, field

import torch

import configs
from reference_impl.spec import ModelSpec

from . import probes as probe_names
from .adapters import Adapter, AdapterError, ReferenceAdapter, resolve
from .compare import ProbeResult, compare_probe, routing_flips
from .decode_check import DECODE_STEPS, judge_greedy
from .synthetic import Batch, make_batch, random_state_dict
from .tolerance import DTYPES, Tolerance, tolerance_for


@dataclass
class ConformanceResult:
    model: str
    dtype: str
    reference: str
    candidate: str
    probes: list[ProbeResult] = field(default_factory=list)
    error: str | None = None
    inputs: str = ""
    seed: int = 0
    wall_s: float = 0.0
    environment: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.probes) and all(p.passed for p in self.probes)

    @property
    def first_divergence(self) -> ProbeResult | None:
        return next((p for p in self.probes if not p.passed), None)

    @property
    def closest(self) -> ProbeResult | None:
        """The judged probe nearest to its tolerance: where it would have failed first."""
        judged = [p for p in self.probes if p.status == "pass"]
        return max(judged, key=ProbeResult.headroom, default=None)

    @property
    def unsupported(self) -> list[ProbeResult]:
        return [p for p in self.probes if p.status == "unsupported"]

    def standing(self, code: str = "") -> str:
        """The error, the first divergence, or (on a pass) where it would have failed first. `code`
        wraps probe names (e.g. a backtick for Markdown)."""
        if self.error:
            return self.error
        first = self.first_divergence
        if first is not None:
            return f"first divergence at {code}{first.name}{code}: {first.note}"
        closest = self.closest
        if closest is None:
            return ""
        if closest.headroom() == 0:
            return "bit-exact at every probe"
        return f"closest to failing: {code}{closest.name}{code} at {closest.headroom():.2g} of tolerance"

    def verdict(self) -> str:
        if self.error:
            return f"ERROR {self.model} [{self.dtype}] {self.candidate}: {self.error}"
        first = self.first_divergence
        if first is not None:
            where = f"layer {first.layer} {first.sublayer}" if first.layer is not None else first.name
            return f"FAIL {self.model} [{self.dtype}] {self.candidate}: first divergence at {first.name} ({where}): {first.note}"
        skipped = f"; {len(self.unsupported)} probes unsupported" if self.unsupported else ""
        flips = sum(int(p.metrics.get("tokens_flipped", 0)) for p in self.probes)
        if flips:
            skipped += f"; {flips} token-layer expert choices flipped on near-ties (rest judged with the candidate's routing)"
        tail = f"; {self.standing()}" if self.closest is not None else ""
        return f"PASS {self.model} [{self.dtype}] {self.candidate} vs {self.reference}: {len(self.probes) - len(self.unsupported)} probes{skipped}{tail}"

    def to_json(self) -> dict:
        first = self.first_divergence
        return {
            "passed": self.passed,
            "model": self.model,
            "dtype": self.dtype,
            "reference": self.reference,
            "candidate": self.candidate,
            "first_divergence": None if first is None else {
                "probe": first.name, "layer": first.layer, "sublayer": first.sublayer,
                "status": first.status, "note": first.note,
            },
            "error": self.error,
            "closest_to_failing": None if self.closest is None else {
                "probe": self.closest.name, "headroom": self.closest.headroom(),
            },
            "inputs": self.inputs,
            "seed": self.seed,
            "wall_s": round(self.wall_s, 3),
            "environment": self.environment,
            "probes": [p.to_json() for p in self.probes],
        }


def environment(dtype: str) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": "cpu",
           "dtype": dtype, "threads": torch.get_num_threads(), "machine": platform.machine()}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def conform(model: str, candidate: str | Adapter = "hf", dtype: str = "float32", seed: int = 0,
            reference: Adapter | None = None) -> ConformanceResult:
    """Run `model` (a name from configs/) through the reference and the candidate; compare every probe.

    Weights are random (see :mod:`harness.synthetic`), drawn from `seed`, as are the inputs. A candidate
    with ``prepare_config(hf_config)`` (vLLM: head sizes its kernels accept) runs a variant of the twin
    it can execute; both implementations get that variant, and the result's inputs say how it differs.
    """
    hf_config = configs.hf_config(model)
    try:
        candidate = resolve(candidate)
    except AdapterError:
        pass  # compare_implementations records it as this run's error
    if hasattr(candidate, "prepare_config"):
        hf_config = candidate.prepare_config(hf_config)
    spec = ModelSpec.from_hf_config(hf_config)
    return compare_implementations(model, hf_config, random_state_dict(spec, seed), make_batch(spec, seed),
                                   candidate=candidate, dtype=dtype, reference=reference, seed=seed)


def compare_implementations(label: str, hf_config: dict, state: dict, batch: Batch, candidate: str | Adapter = "hf",
                            dtype: str = "float32", reference: Adapter | None = None, seed: int = 0,
                            tol: Tolerance | None = None) -> ConformanceResult:
    """Load `state` into the reference and the candidate, run `batch` through both, compare every probe."""
    start = time.perf_counter()
    torch_dtype = DTYPES[dtype]
    spec = ModelSpec.from_hf_config(hf_config)
    tol = tol or tolerance_for(dtype, spec.family)
    reference = reference or ReferenceAdapter()
    name = candidate if isinstance(candidate, str) else getattr(candidate, "name", type(candidate).__name__)
    result = ConformanceResult(label, dtype, reference.name, name, inputs=batch.describe(), seed=seed,
                               environment=environment(dtype))
    reference.load(hf_config, state, torch_dtype)
    adapter = None
    try:
        adapter = resolve(candidate)
        result.candidate = adapter.name
        adapter.load(hf_config, state, torch_dtype)
        cand_out = adapter.run(batch)
        generated = adapter.generate(batch, DECODE_STEPS) if hasattr(adapter, "generate") else None
    except AdapterError as exc:
        result.error = str(exc)
    except Exception as exc:  # noqa: BLE001 - a crashing candidate is a result, not a crash of the gate
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        result.error = f"candidate crashed: {type(exc).__name__}: {exc} (at {frame.filename}:{frame.lineno})"
    else:
        result.probes = _judge(spec, reference, batch, cand_out, tol, getattr(adapter, "unsupported", {}) or {},
                               getattr(adapter, "logits_form", "logits"))
        if generated is not None:
            result.probes.append(judge_greedy(reference, batch.prompts(), generated, tol))
        if cand_out.get("logits") is None:
            result.error = "candidate returned no logits"
    finally:
        if hasattr(adapter, "close"):
            adapter.close()  # e.g. vLLM's model directory
    if getattr(adapter, "config_note", ""):
        result.inputs += f"; model variant: {adapter.config_note}"
    result.environment.update(getattr(adapter, "environment", None) or {})
    result.wall_s = time.perf_counter() - start
    return result


def _compare_all(spec, reference, ref_out, cand_out, batch, tol, reasons) -> list[ProbeResult]:
    out = []
    for probe in probe_names.for_spec(spec):
        reason = reasons.get(probe) or reasons.get("*", "")
        ref, ref_probs, isolated = ref_out[probe], ref_out.get(probe + "_probs"), False
        router_input = cand_out.get(probe + "_input")
        if probe.endswith(".router") and router_input is not None and hasattr(reference, "route"):
            # Judge the router alone: the reference router on the candidate's own router input.
            ref, ref_probs = reference.route(probe_names.locate(probe)[0], router_input)
            isolated = True
        result = compare_probe(probe, ref, cand_out.get(probe), batch.valid, tol, reason, ref_probs=ref_probs,
                               cand_probs=cand_out.get(probe + "_probs"), isolated=isolated)
        if isolated and result.status == "pass":
            _check_router_context(result, probe, ref_out, cand_out, router_input, batch, tol)
        out.append(result)
    return out


def _check_router_context(result: ProbeResult, probe, ref_out, cand_out, router_input, batch, tol) -> None:
    """A router that is right on its own input must also read the right input (the post-attention
    residual, judged like an ``out`` probe), and its choices may differ from what the reference router
    picks at that layer (given the same routing upstream) only on near-ties; those flips are counted
    as ``tokens_flipped``."""
    read = compare_probe(probe.replace(".router", ".out"), ref_out[probe + "_input"], router_input, batch.valid, tol)
    result.metrics["input_max_rel"] = read.metrics.get("max_rel", float("nan"))
    if read.status != "pass":
        result.status = "fail"
        result.note = f"router input differs from the reference's ({read.note}); {result.note}"
        return
    probs = ref_out[probe + "_probs"]  # the reference router's own probabilities (before any forcing)
    k = int((cand_out[probe][batch.valid] != 0).sum(-1).max())
    natural = torch.zeros_like(probs).scatter(-1, torch.topk(probs, k, dim=-1).indices, 1.0)
    n, margin = routing_flips(natural, cand_out[probe], batch.valid, probs)
    result.metrics["tokens_flipped"] = float(n)
    result.metrics["flip_max_margin"] = margin
    if n and margin > tol.router_margin:
        result.status = "fail"
        result.note = f"{n} tokens chose other experts than the reference beyond a near-tie (margin {margin:.2g}); {result.note}"
    elif n:
        result.note = (f"{n} tokens chose other experts than the reference, all near-ties (margin <= {margin:.2g}): "
                       f"later probes judged with the candidate's routing; {result.note}")


def _judge(spec, reference, batch, cand_out, tol, reasons, logits_form="logits") -> list[ProbeResult]:
    """Run the reference and compare every probe. On MoE models whose candidate exposes its expert
    choices, the reference runs routed as the candidate, so every probe is judged on the same routing
    rather than through a widened tolerance; each router is judged alone (see
    :func:`_check_router_context`)."""
    forced = {}
    for layer in spec.layers:
        dispatch = cand_out.get(f"layers.{layer.index}.router")
        if layer.moe is not None and dispatch is not None:
            forced[layer.index] = torch.topk(dispatch.float(), k=layer.moe.top_k, dim=-1).indices
    ref_out = reference.run(batch, forced_routing=forced) if forced else reference.run(batch)
    if logits_form == "logprobs":  # the candidate reports log-probabilities: compare log-softmaxed logits
        ref_out = {**ref_out, "logits": torch.log_softmax(ref_out["logits"].float(), dim=-1)}
    return _compare_all(spec, reference, ref_out, cand_out, batch, tol, reasons)


def result_from_json(data: dict) -> ConformanceResult:
    """Rebuild a result written by :meth:`ConformanceResult.to_json` (used to resume long runs)."""
    fields = ("name", "status", "metrics", "tolerance", "note")
    probes = [ProbeResult(**{k: p[k] for k in fields}) for p in data.get("probes", [])]
    return ConformanceResult(
        model=data["model"], dtype=data["dtype"], reference=data["reference"], candidate=data["candidate"],
        probes=probes, error=data.get("error"), inputs=data.get("inputs", ""), seed=data.get("seed", 0),
        wall_s=data.get("wall_s", 0.0), environment=data.get("environment", {}),
    )
