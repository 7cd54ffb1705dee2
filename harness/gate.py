"""The conformance gate: one model, a reference and a candidate implementation, every probe compared."""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import platform
import re
import time
import traceback
from dataclasses import dataclass, field

import torch

import configs
from reference_impl.spec import ModelSpec

from . import probes as probe_names
from . import version_string
from .adapters import Adapter, AdapterError, ReferenceAdapter, resolve
from .adapters.base import Unsupported, _import_object, check_outputs, supports
from .adapters.reference import LazyLogits
from .compare import ProbeResult, compare_probe, routing_flips
from .decode_check import DECODE_STEPS, judge_greedy
from .footprint import Footprint, estimate
from .synthetic import Batch, conditioning_for, make_batch, random_state_dict
from .tolerance import DTYPES, Tolerance, tolerance_for

# logits larger than this (batch x tokens x vocabulary values) are computed by the reference a slice at a
# time while they are compared, never held whole (a full-size 262k vocabulary over a beyond-window batch)
LAZY_LOGITS_ABOVE = 2**27


@dataclass
class Capability:
    """Whether a feature the gate exercises was judged: ``judged``, ``not judged`` (the input did not
    need it) or ``unsupported`` (the candidate lacks it; ``reason`` says why, in the port's words)."""

    status: str
    reason: str = ""

    def line(self, feature: str) -> str:
        return f"{feature}: {self.status}" + (f" — {self.reason}" if self.reason else "")


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
    capabilities: dict[str, Capability] = field(default_factory=dict)
    key: dict = field(default_factory=dict)  # what determines the result (Plan.key): --resume reuses only a match
    # the candidate cannot run this model here at all (e.g. a dependency it needs is missing), and why: not a
    # failure, nothing judged
    not_run: str | None = None

    @property
    def lacking(self) -> list[str]:
        """One line per feature the candidate lacks: "padding: unsupported — <its reason>"."""
        return [c.line(f) for f, c in self.capabilities.items() if c.status == "unsupported"]

    @property
    def passed(self) -> bool:
        """Nothing failed: every probe passed (or is unsupported), or the candidate could not run here at all."""
        if self.error is not None:
            return False
        return self.not_run is not None or (bool(self.probes) and all(p.passed for p in self.probes))

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
        if self.not_run:
            return f"not run: {self.not_run}"
        lacking = "".join(f"; {line}" for line in self.lacking)
        first = self.first_divergence
        if first is not None:
            return f"first divergence at {code}{first.name}{code}: {first.note}{lacking}"
        closest = self.closest
        if closest is None:
            return lacking.removeprefix("; ")
        if closest.headroom() == 0:
            return f"bit-exact at every probe{lacking}"
        return f"closest to failing: {code}{closest.name}{code} at {closest.headroom():.2g} of tolerance{lacking}"

    def verdict(self) -> str:
        if self.error:
            return f"ERROR {self.model} [{self.dtype}] {self.candidate}: {self.error}"
        if self.not_run:
            return f"UNSUPPORTED {self.model} [{self.dtype}] {self.candidate}: {self.not_run}"
        first = self.first_divergence
        if first is not None:
            where = f"layer {first.layer} {first.sublayer}" if first.layer is not None else first.name
            return (f"FAIL {self.model} [{self.dtype}] {self.candidate}: first divergence at {first.name} ({where}): "
                    f"{self.standing().split(': ', 1)[1]}")
        skipped = f"; {len(self.unsupported)} probes unsupported" if self.unsupported else ""
        flips = sum(int(p.metrics.get("tokens_flipped", 0)) for p in self.probes)
        if flips:
            skipped += f"; {flips} token-layer expert choices flipped on near-ties (rest judged with the candidate's routing)"
        tail = f"; {self.standing()}" if self.standing() else ""
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
            "not_run": self.not_run,
            "closest_to_failing": None if self.closest is None else {
                "probe": self.closest.name, "headroom": self.closest.headroom(),
            },
            "key": self.key,
            "capabilities": {f: {"status": c.status, "reason": c.reason} for f, c in self.capabilities.items()},
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
    for package in ("timm", "torchvision"):  # what HF builds Gemma 3n's vision tower with (tox -e timm)
        try:
            env[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return env


@dataclass(frozen=True)
class Plan:
    """One gate run, decided before any work: what it runs, on what, and what it will need."""

    label: str  # the model as every output names it ("gemma-3-4b (first 4 of 34 layers)" when cut)
    model: str
    dtype: str
    seed: int
    hf_config: dict
    spec: ModelSpec
    batch: Batch
    footprint: Footprint

    def key(self, candidate: str, implementation: str) -> dict:
        """Everything that determines the result: a results file reused by ``--resume`` must match it."""
        config = json.dumps(self.hf_config, sort_keys=True, default=str).encode()
        return {"model": self.label, "dtype": self.dtype, "candidate": candidate, "implementation": implementation,
                "seed": self.seed, "inputs": f"{self.batch.describe()}; weights {conditioning_for(self.dtype).name}",
                "config_sha256": hashlib.sha256(config).hexdigest()[:16], "harness": version_string()}


def plan(model: str, candidate: Adapter | None = None, dtype: str = "float32", seed: int = 0,
         layers: int | None = None) -> Plan:
    """The run of `model` (a name from configs/; the first `layers` layers only, if given), with the
    variant a candidate with ``prepare_config`` needs (vLLM: head sizes its kernels accept)."""
    hf_config = configs.hf_config(model)
    label = model
    total = configs.text_config(hf_config)["num_hidden_layers"]
    if layers is not None and layers != total:
        label = f"{model} (first {layers} of {total} layers)"
        hf_config = configs.cut(hf_config, layers)
    if isinstance(candidate, Adapter):
        hf_config = candidate.prepare_config(hf_config)
    spec = ModelSpec.from_hf_config(hf_config)
    batch = make_batch(spec, seed)
    footprint = estimate(spec, *batch.input_ids.shape, DTYPES[dtype])
    return Plan(label, model, dtype, seed, hf_config, spec, batch, footprint)


def conform(model: str, candidate: str | Adapter = "hf", dtype: str = "float32", seed: int = 0,
            reference: Adapter | None = None, layers: int | None = None) -> ConformanceResult:
    """Run `model` (a name from configs/) through the reference and the candidate; compare every probe.

    Weights are random (see :mod:`harness.synthetic`), drawn from `seed`, as are the inputs. A candidate
    with ``prepare_config(hf_config)`` (vLLM: head sizes its kernels accept) runs a variant of the twin
    it can execute; both implementations get that variant, and the result's inputs say how it differs.
    ``layers`` cuts the model to its first layers (said so in the result's model name).
    """
    given = candidate_label(candidate)
    try:
        candidate = resolve(candidate)
    except AdapterError:
        pass  # compare_implementations records it as this run's error
    run = plan(model, candidate if isinstance(candidate, Adapter) else None, dtype, seed, layers)
    conditioning = conditioning_for(dtype)
    result = compare_implementations(run.label, run.hf_config, random_state_dict(run.spec, seed, conditioning),
                                     run.batch, candidate=candidate, dtype=dtype, reference=reference, seed=seed)
    result.inputs += f"; weights drawn {conditioning.name} ({conditioning.purpose})"
    result.key = run.key(given, result.candidate)
    return result


def candidate_label(candidate: str | Adapter) -> str:
    """How a run names its candidate in its key: the string given, or the adapter's class (and source
    file hash, so an edited port is not mistaken for the one that wrote a results file)."""
    if isinstance(candidate, str):
        if ":" not in candidate:
            return candidate  # a built-in implementation: its version is in the implementation's name
        try:
            target = _import_object(candidate)
        except AdapterError:
            return candidate
        label = candidate
    else:
        target = candidate if inspect.isclass(candidate) else (
            getattr(candidate, "model_class", None) or type(getattr(candidate, "inner", candidate)))
        label = f"{target.__module__}:{target.__qualname__}"
    digest = _source_digest(target)
    return f"{label}@{digest}" if digest else label


def _source_digest(obj) -> str:
    """sha256 (12 hex digits) of the file that defines ``obj``, or '' if it has none."""
    try:
        source = inspect.getsourcefile(obj if inspect.isclass(obj) or inspect.isfunction(obj) else type(obj))
        return hashlib.sha256(open(source, "rb").read()).hexdigest()[:12] if source else ""
    except (TypeError, OSError):
        return ""


def compare_implementations(label: str, hf_config: dict, state: dict, batch: Batch, candidate: str | Adapter = "hf",
                            dtype: str = "float32", reference: Adapter | None = None, seed: int = 0,
                            tol: Tolerance | None = None) -> ConformanceResult:
    """Load `state` into the reference and the candidate, run `batch` through both, compare every probe."""
    start = time.perf_counter()
    torch_dtype = DTYPES[dtype]
    spec = ModelSpec.from_hf_config(hf_config)
    tol = tol or tolerance_for(dtype, spec.family)
    reference = reference or ReferenceAdapter(lazy_logits=batch.input_ids.numel() * spec.vocab_size > LAZY_LOGITS_ABOVE)
    name = candidate if isinstance(candidate, str) else getattr(candidate, "name", type(candidate).__name__)
    result = ConformanceResult(label, dtype, reference.name, name, inputs=batch.describe(), seed=seed,
                               environment=environment(dtype))
    reference.load(hf_config, state, torch_dtype)
    adapter = None
    try:
        adapter = resolve(candidate)
        result.candidate = adapter.name
        before = _fingerprint(state)
        try:
            adapter.load(hf_config, state, torch_dtype)
        except Unsupported as exc:  # this candidate cannot build this model here: reported, not a failure
            result.not_run = exc.reason
        else:
            runs, result.capabilities = run_candidate(adapter, batch)
            _check_untouched(adapter.name, state, before)
            # the greedy-decode check feeds the reference's cached decode text only: not on a batch with media
            generated = adapter.generate(batch, DECODE_STEPS) if supports(adapter, "generate") and not batch.media else None
    except AdapterError as exc:
        result.error = str(exc)
    except Unsupported as exc:  # "model": the candidate cannot run this model here, reported, not a failure
        if exc.feature == "model":
            result.not_run = exc.reason
        else:
            result.error = f"candidate crashed: {crash_line(exc)}"
    except Exception as exc:  # noqa: BLE001 - a crashing candidate is a result, not a crash of the gate
        result.error = count_mismatch(exc) or f"candidate crashed: {crash_line(exc)}"
    else:
        if result.not_run is None:
            result.probes = _judge(spec, reference, runs, tol, adapter.unsupported or {}, adapter.logits_form)
            if generated is not None:
                result.probes.append(judge_greedy(reference, batch.prompts(), generated, tol))
            if any(out.get("logits") is None for _, out in runs):
                result.error = "candidate returned no logits"
    finally:
        if adapter is not None:
            adapter.close()  # e.g. vLLM's model directory
    if adapter is not None and adapter.config_note:
        result.inputs += f"; model variant: {adapter.config_note}"
    if result.capabilities.get("padding", Capability("")).status == "unsupported":
        result.inputs += "; the candidate ran each row alone, without padding"
    if result.capabilities.get("position_ids", Capability("")).status == "unsupported":
        result.inputs += "; the candidate was given no position ids"
    result.environment.update((adapter.environment if adapter is not None else None) or {})
    result.wall_s = time.perf_counter() - start
    return result


def _fingerprint(state: dict) -> dict[str, float]:
    """A cheap checksum of every tensor (a strided sample of it): the reference holds these tensors
    themselves, so a candidate must not write to them."""
    out = {}
    for name, t in state.items():
        flat = t.detach().reshape(-1)
        out[name] = float(flat[:: max(1, flat.numel() // 4096)].double().sum())
    return out


def _check_untouched(name: str, state: dict, before: dict[str, float]) -> None:
    after = _fingerprint(state)
    changed = [k for k in before if after[k] != before[k] and not (after[k] != after[k] and before[k] != before[k])]
    if changed:
        raise AdapterError(f"{name}: modified the weights it was given in place (tensor {changed[0]!r}); "
                           "the reference shares them, so the comparison would be meaningless: copy before changing")


def crash_line(exc: BaseException) -> str:
    """An exception as one line: type, message and the innermost frame."""
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" (at {frame.filename}:{frame.lineno})" if frame else ""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}{where}"


_COUNT_MISMATCH = re.compile(r"(features and \w+ tokens do not match|placeholder tokens for)", re.IGNORECASE)


def count_mismatch(exc: BaseException) -> str | None:
    """A candidate that gives another number of soft tokens than the prompt has placeholders (HF: "Image
    features and image tokens do not match, tokens: 129, features: 127") as one line saying so, or None."""
    message = " ".join(str(exc).split())
    if not _COUNT_MISMATCH.search(message):
        return None
    return f"soft-token count mismatch: the candidate's media give another number of soft tokens than the prompt " \
           f"has placeholders ({message})"


def _reason(exc: BaseException) -> str:
    return exc.reason if isinstance(exc, Unsupported) else crash_line(exc)


def run_candidate(adapter: Adapter, batch: Batch) -> tuple[list[tuple[Batch, dict]], dict[str, Capability]]:
    """The candidate's probes on ``batch``: [(batch it ran, probes)], and what it could do.

    Tried in order, skipping what the adapter declares unsupported: the batch as is (left-padded, with
    explicit position ids); the batch without position ids; each row alone with positions 0..n-1; each
    row alone without position ids. The first that runs is judged; a feature whose attempt failed is
    reported unsupported with the port's own reason, so a port that cannot pad (or take position ids)
    is told apart from a wrong one, and every probe is still judged. A candidate that fails even on a
    lone unpadded row without position ids has crashed.
    """
    declared = adapter.unsupported or {}
    can_pad, can_position = "padding" not in declared, "position_ids" not in declared
    attempts = [("batch", True), ("batch", False), ("rows", True), ("rows", False)]
    failed: dict[tuple[str, bool], BaseException] = {}
    for shape, positions in attempts:
        if (shape == "batch" and not can_pad and batch.padded) or (positions and not can_position):
            continue
        if shape == "rows" and not batch.padded:
            break  # an unpadded batch has nothing to fall back to
        batches = [batch.without_positions() if not positions else batch] if shape == "batch" else batch.rows(positions)
        try:
            runs = [(b, _outputs(adapter, b)) for b in batches]
        except Unsupported as exc:
            if exc.feature == "model":  # it cannot run this model at all: no other way of feeding it helps
                raise
            failed[(shape, positions)] = exc
            last = exc
            continue
        except Exception as exc:  # noqa: BLE001 - tell a port that lacks a feature from one that crashes
            failed[(shape, positions)] = exc
            last = exc
            continue
        return runs, _capabilities(declared, failed, shape, positions, batch.padded)
    raise last if failed else AdapterError(f"{adapter.name}: declares every way of running a batch unsupported")


def _capabilities(declared, failed, shape, positions, padded) -> dict[str, Capability]:
    """What the successful attempt (``shape``, ``positions``) and the failed ones before it say."""
    def reason(feature, *keys):
        if feature in declared:
            return declared[feature]
        exc = next((failed[k] for k in keys if k in failed), None)
        return _reason(exc) if exc is not None else "not tried"

    if shape == "batch":
        padding = Capability("judged") if padded else Capability("not judged", "the batch has no padded row")
    else:
        padding = Capability("unsupported", reason("padding", ("batch", False), ("batch", True)))
    if positions:
        position_ids = Capability("judged")
    else:
        position_ids = Capability("unsupported", reason("position_ids", ("batch", True), ("rows", True)))
    return {"padding": padding, "position_ids": position_ids}


def _outputs(adapter: Adapter, batch: Batch) -> dict[str, torch.Tensor]:
    return check_outputs(adapter.name, adapter.run(batch), batch)


@dataclass
class _Run:
    """One forward of both implementations: the batch, the reference's probes, the candidate's, and what
    the reference computes from the candidate's own values (:class:`_Isolated`)."""

    batch: Batch
    ref: dict[str, torch.Tensor]
    cand: dict[str, torch.Tensor]
    isolated: _Isolated


def _forced_routing(spec, cand_out) -> dict[int, torch.Tensor]:
    forced = {}
    for layer in spec.layers:
        dispatch = cand_out.get(f"layers.{layer.index}.router")
        if layer.moe is not None and dispatch is not None:
            forced[layer.index] = torch.topk(dispatch.float(), k=layer.moe.top_k, dim=-1).indices
    return forced


class _Isolated:
    """What the reference computes from the candidate's own values, probe by probe: each sublayer rerun
    on the candidate's input, and each stream probe (a sublayer's input, a layer's output) recomputed
    from the candidate's upstream probes. Every probe is then judged on one operation alone, so rounding
    drift does not accumulate over the layers and the first failing probe is the first wrong operation.
    Computed when a probe is judged, not before: a full-size run would hold another copy of every probe."""

    def __init__(self, spec, reference, batch: Batch, ref_out: dict, cand_out: dict):
        self.spec, self.reference, self.batch, self.cand = spec, reference, batch, cand_out
        self.values = {**ref_out, **cand_out}  # a KV-shared layer's donor input: the candidate's, else the reference's

    def __contains__(self, probe: str) -> bool:
        if not hasattr(self.reference, "sublayer"):
            return False
        upstream = probe_names.upstream_values(self.spec, probe)
        if upstream is not None:
            return all(u in self.cand for u in upstream)
        if probe_names.input_of(probe) not in self.cand or probe.endswith(".router"):
            return False
        return not probe.endswith(".moe") or probe.replace(".moe", ".router") in self.cand

    def __getitem__(self, probe: str) -> torch.Tensor:
        if probe_names.upstream_values(self.spec, probe) is not None:
            return self.reference.stream(probe, self.values, self.batch)
        routing = self.cand.get(probe.replace(".moe", ".router")) if probe.endswith(".moe") else None
        return self.reference.sublayer(probe, self.values, self.batch, routing)


def _judge(spec, reference, runs, tol, reasons, logits_form="logits") -> list[ProbeResult]:
    """Run the reference on what the candidate ran and compare every probe. On MoE models whose
    candidate exposes its expert choices, the reference runs routed as the candidate, so every probe is
    judged on the same routing rather than through a widened tolerance; each router is judged alone
    (see :func:`_check_routing`)."""
    judged = []
    for run_batch, cand_out in runs:
        forced = _forced_routing(spec, cand_out)
        ref_out = reference.run(run_batch, forced_routing=forced) if forced else reference.run(run_batch)
        if logits_form == "logprobs":  # the candidate reports log-probabilities: compare log-softmaxed logits
            log_softmax = lambda x: torch.log_softmax(x.float(), dim=-1)  # noqa: E731
            logits = ref_out["logits"]
            ref_out = {**ref_out, "logits": logits.with_transform(log_softmax) if isinstance(logits, LazyLogits)
                       else log_softmax(logits)}
        judged.append(_Run(run_batch, ref_out, cand_out, _Isolated(spec, reference, run_batch, ref_out, cand_out)))
    return [_judge_probe(spec, reference, probe, judged, tol, reasons) for probe in probe_names.for_spec(spec)]


def _judge_probe(spec, reference, probe, runs: list[_Run], tol, reasons) -> ProbeResult:
    reason = reasons.get(probe) or reasons.get("*", "")
    if probe_names.is_media(probe):  # (items, tokens, ...): every token is real; runs without the media have none
        runs = [r for r in runs if probe in r.ref]
        if not runs:
            what = "audio" if probe.startswith("audio.") else "image"
            return ProbeResult(probe, "unsupported", note=f"not judged: the batch holds no {what}")
        valid = [torch.ones(r.ref[probe].shape[:2], dtype=torch.bool) for r in runs]
    elif probe == "logits" and spec.multimodal is not None:
        valid = [r.batch.valid & ~_placeholders(spec, r.batch) for r in runs]
    else:
        valid = [r.batch.valid for r in runs]
    cand = [r.cand.get(probe) for r in runs]
    if probe.endswith(".router"):
        result = _judge_router(reference, probe, runs, tol, reason)
        isolated = all(probe + "_input" in r.cand for r in runs)
    else:
        isolated = all(probe in r.isolated for r in runs)
        ref = [r.isolated[probe] if isolated else r.ref[probe] for r in runs]
        result = compare_probe(probe, ref, None if any(c is None for c in cand) else cand, valid, tol, reason,
                               isolated=isolated)
        if isolated and result.status in ("pass", "fail"):
            _add_drift(result, probe, runs, cand, valid)
    result.isolated = isolated and result.judged
    if result.judged and not isolated and not probe.endswith(".router") and probe not in ("embed", "logits", "vision.embed"):
        missing = [u for u in (probe_names.upstream_values(spec, probe) or [probe_names.input_of(probe)])
                   if u and any(u not in r.cand for r in runs)]
        result.note = "; ".join(filter(None, [f"not isolated (the candidate gives no {', '.join(missing)})",
                                              result.note]))
    if not result.passed and result.status != "error":
        result.note = f"{probe_names.blame(spec, probe, isolated)}; {result.note}"
    return result


def _placeholders(spec, batch: Batch) -> torch.Tensor:
    """(B, T) True at media placeholders. Their logits are judged nowhere: no generation reads the next-token
    prediction from inside an image or a clip, and there they are the noisiest values of the model (bf16 vs
    float64 reference, trained-like weights, kl_max over 3 seeds: 1.2 at gemma-4-e2b-mm-tiny's placeholders,
    at most 2.9e-3 at its text positions; Gemma 3 image-text 0.039 vs 7e-19). Their hidden states are judged
    at every layer like any token's: through attention they are what the text after them reads."""
    return torch.isin(batch.input_ids, torch.tensor(spec.multimodal.placeholder_ids))


def _add_drift(result: ProbeResult, probe: str, runs: list[_Run], cand, valid) -> None:
    """How far the candidate's value is from the reference's own stream (not gated: the accumulated
    rounding of every operation before it, for the report)."""
    if any(isinstance(r.ref[probe], LazyLogits) for r in runs):
        return
    drift = compare_probe(probe, [r.ref[probe] for r in runs], cand, valid, _no_limits())
    for key in ("max_rel", "rel_rms"):
        if key in drift.metrics:
            result.metrics[f"drift_{key}"] = drift.metrics[key]


def _no_limits() -> Tolerance:
    """Metrics without a verdict (for figures that are reported, not gated)."""
    inf = float("inf")
    return Tolerance("none", {"max_rel": inf, "rel_rms": inf, "kl_max": inf}, router_margin=inf, router_probs=inf)


def _judge_router(reference, probe, runs: list[_Run], tol, reason) -> ProbeResult:
    """The router's expert choice. With its input (``router_input``) it is judged alone: the reference
    router on the candidate's own input. Without it, its expert sets are compared with the reference's
    own routing (given the same upstream routing) under the near-tie rule, and its weights where they
    agree."""
    valid = [r.batch.valid for r in runs]
    cand = [r.cand.get(probe) for r in runs]
    if any(c is None for c in cand):
        return compare_probe(probe, [r.ref[probe] for r in runs], None, valid, tol, reason)
    layer = probe_names.locate(probe)[0]
    has_input = all(probe + "_input" in r.cand for r in runs)
    if has_input:
        routed = [reference.route(layer, r.cand[probe + "_input"]) for r in runs]
        ref, ref_probs = [d for d, _ in routed], [p for _, p in routed]
    else:
        ref, ref_probs = [r.ref[probe] for r in runs], [r.ref[probe + "_probs"] for r in runs]
    cand_probs = [r.cand.get(probe + "_probs") for r in runs]
    result = compare_probe(probe, ref, cand, valid, tol, reason, ref_probs=ref_probs,
                           cand_probs=None if any(p is None for p in cand_probs) else cand_probs, isolated=has_input)
    if result.status == "pass":
        _check_routing(result, probe, runs, tol)
    if not has_input and result.judged:
        result.note = "; ".join(filter(None, [f"not isolated (no {probe}_input): expert sets compared with the "
                                              "reference's own routing", result.note]))
    return result


def _check_routing(result: ProbeResult, probe, runs: list[_Run], tol) -> None:
    """The candidate's expert choices may differ from what the reference router picks at that layer
    (given the same routing upstream) only on near-ties; those flips are counted as ``tokens_flipped``."""
    probs = [r.ref[probe + "_probs"] for r in runs]  # the reference router's own probabilities (before any forcing)
    cand = [r.cand[probe] for r in runs]
    valid = [r.batch.valid for r in runs]
    k = max(int((c[v] != 0).sum(-1).max()) for c, v in zip(cand, valid, strict=True))
    natural = [torch.zeros_like(p).scatter(-1, torch.topk(p, k, dim=-1).indices, 1.0) for p in probs]
    n, margin = routing_flips(natural, cand, valid, probs)
    result.metrics["tokens_flipped"] = float(n)
    result.metrics["flip_max_margin"] = margin
    if n and margin > tol.router_margin:
        result.status = "fail"
        result.note = (f"the router chooses other experts than the reference beyond a near-tie: {n} tokens "
                       f"(margin {margin:.2g}); {result.note}")
    elif n:
        result.note = (f"{n} tokens chose other experts than the reference, all near-ties (margin <= {margin:.2g}): "
                       f"later probes judged with the candidate's routing; {result.note}")


def result_from_json(data: dict) -> ConformanceResult:
    """Rebuild a result written by :meth:`ConformanceResult.to_json` (used to resume long runs)."""
    fields = ("name", "status", "metrics", "tolerance", "note")
    probes = [ProbeResult(**{k: p[k] for k in fields}, isolated=bool(p.get("isolated"))) for p in data.get("probes", [])]
    return ConformanceResult(
        model=data["model"], dtype=data["dtype"], reference=data["reference"], candidate=data["candidate"],
        probes=probes, error=data.get("error"), inputs=data.get("inputs", ""), seed=data.get("seed", 0),
        wall_s=data.get("wall_s", 0.0), environment=data.get("environment", {}),
        capabilities={f: Capability(c["status"], c.get("reason", "")) for f, c in data.get("capabilities", {}).items()},
        key=data.get("key") or {}, not_run=data.get("not_run"),
    )
