"""The memory planner (`gemma-harness plan`): each term against a hand computation, every released
variant, the CLI's exits, and the published-claims verdicts derived from the figures."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

import configs
from harness import planner
from harness.cli import main
from harness.kvcache import breakdown
from harness.planner import GIB, MIB, Assumptions, PlanError, plan

ROOT = Path(__file__).resolve().parent.parent
SEEDS = Path("/work/shared/seeds")
GEMMA3_1B_PARAMS = 999_885_952  # by hand below


def _gemma3_1b_params_by_hand() -> int:
    """26 layers of hidden 1152: q 4x256 and o, k and v 1x256, a 6912-wide gated MLP, four 1152 norms and
    two 256 q/k norms; a tied 262,144 x 1152 embedding; the final norm."""
    h, q, kv, mlp = 1152, 4 * 256, 256, 6912
    layer = 2 * h * q + 2 * h * kv + 3 * h * mlp + 4 * h + 2 * 256
    return 26 * layer + 262_144 * h + h


def test_gemma3_1b_parameters_by_hand_and_bf16_weights_are_two_bytes_each():
    assert _gemma3_1b_params_by_hand() == GEMMA3_1B_PARAMS
    r = plan("gemma-3-1b", "bf16", "bf16", 4096)
    assert r["params"]["total"] == GEMMA3_1B_PARAMS
    assert r["breakdown"]["weights_bytes"] == GEMMA3_1B_PARAMS * 2
    assert plan("gemma-3-1b", "fp8", "bf16", 4096)["breakdown"]["weights_bytes"] == GEMMA3_1B_PARAMS
    assert plan("gemma-3-1b", "float32", "bf16", 4096)["breakdown"]["weights_bytes"] == GEMMA3_1B_PARAMS * 4


@pytest.mark.parametrize("group, bits_per_weight", [(32, 4.5), (128, 4.125), (64, 4.25)])
def test_int4_weights_carry_one_fp16_scale_per_group(group, bits_per_weight):
    a = Assumptions(int4_group_size=group)
    r = plan("gemma-3-1b", "int4", "bf16", 4096, assumptions=a)
    assert r["breakdown"]["weights_bytes"] == pytest.approx(GEMMA3_1B_PARAMS * bits_per_weight / 8, rel=1e-12)
    assert r["assumptions"]["int4_group_size"]["value"] == group and r["assumptions"]["int4_group_size"]["why"]


def test_kv_term_is_the_minimal_figure_by_hand():
    """gemma-3-1b, 32K tokens, batch 2: 4 full layers hold all tokens, 22 sliding ones 512; one KV head of
    256 dims, K and V, 2 bytes."""
    r = plan("gemma-3-1b", "bf16", "bf16", "32k", batch=2)
    by_hand = 2 * 256 * 2 * 2 * (4 * 32768 + 22 * 512)
    assert r["breakdown"]["kv_minimal_bytes"] == by_hand == r["breakdown"]["kv_stored_bytes"]
    spec = planner._spec("gemma-3-1b")
    assert r["breakdown"]["kv_minimal_bytes"] == breakdown(spec, 32768, 2, "bfloat16")["minimal_bytes"]


def test_k_eq_v_model_reports_minimal_and_stored_and_totals_each():
    """gemma-4-31b at 128K: its 10 global K=V layers (4 x 512) keep one projection in the minimal figure."""
    r = plan("gemma-4-31b", "int4", "bf16", "128k")
    b = r["breakdown"]
    global_one = 10 * 4 * 512 * 131072 * 2
    sliding = 50 * 16 * 256 * 2 * 1024 * 2
    assert b["kv_minimal_bytes"] == global_one + sliding
    assert b["kv_stored_bytes"] == 2 * global_one + sliding
    extra = (b["kv_stored_bytes"] - b["kv_minimal_bytes"]) * 1.05
    assert r["total_stored_kv_bytes"] - r["total_bytes"] == pytest.approx(extra)


def test_activations_and_overhead_by_hand():
    a = Assumptions()
    r = plan("gemma-3-1b", "bf16", "bf16", 4096, batch=2, assumptions=a)
    acts = 2 * 2048 * 6912 * 4 * 2 + 2 * 262_144 * 4  # chunk 2048 of the widest (MLP 6912) x 4 buffers x 2 B; logits
    assert r["breakdown"]["activation_bytes"] == acts
    short = plan("gemma-3-1b", "bf16", "bf16", 100, assumptions=a)  # a context below the chunk is its own chunk
    assert short["breakdown"]["activation_bytes"] == 100 * 6912 * 4 * 2 + 262_144 * 4
    b = r["breakdown"]
    variable = GEMMA3_1B_PARAMS * 2 + b["kv_minimal_bytes"] + acts
    assert r["total_bytes"] == pytest.approx(variable * 1.05 + GIB)
    assert b["overhead_bytes"] == pytest.approx(variable * 0.05 + GIB)
    assert r["total_bytes"] == pytest.approx(b["weights_bytes"] + b["kv_minimal_bytes"] + acts + b["overhead_bytes"])


def test_moe_activation_width_is_top_k_times_expert_width():
    """26B-A4B: hidden 2816, dense MLP 2112, 8 experts of 704 per token: 5632 is the widest."""
    r = plan("gemma-4-26b-a4b", "bf16", "bf16", 4096)
    assert r["breakdown"]["activation_bytes"] == 2048 * 8 * 704 * 4 * 2 + 262_144 * 4


def test_ple_offload_moves_exactly_the_ple_table_to_the_host():
    hf = configs.hf_config("gemma-4-e2b")
    table = hf["vocab_size_per_layer_input"] * hf["num_hidden_layers"] * hf["hidden_size_per_layer_input"]
    assert table == 2_348_810_240 == configs.load("gemma-4-e2b")["published_params"]["per_layer_embedding"]
    on = plan("gemma-4-e2b", "int4", "bf16", "128k", ple_offload=True)
    off = plan("gemma-4-e2b", "int4", "bf16", "128k")
    per = 4.5 / 8
    assert on["params"]["on_host"] == table and off["params"]["on_host"] == 0
    assert on["breakdown"]["ple_host_bytes"] == pytest.approx(table * per)
    assert off["breakdown"]["weights_bytes"] - on["breakdown"]["weights_bytes"] == pytest.approx(table * per)
    assert off["total_bytes"] - on["total_bytes"] == pytest.approx(table * per * 1.05)


def test_ple_offload_is_refused_for_a_model_without_ple():
    with pytest.raises(PlanError, match="no per-layer-embedding table"):
        plan("gemma-4-31b", ple_offload=True)


@pytest.mark.parametrize("model", configs.names(tiny=False))
def test_every_released_variant_plans_and_its_count_matches_the_published_one(model):
    r = plan(model, "int4", "fp8", 4096)
    b = r["breakdown"]
    pub = configs.load(model)["published_params"]
    assert abs(r["params"]["total"] - pub["total"]) <= pub["tolerance"]["total"]
    assert r["params"]["published"]["matches"]
    assert 0 < b["kv_minimal_bytes"] <= b["kv_stored_bytes"]
    assert r["total_bytes"] > b["weights_bytes"] + b["kv_minimal_bytes"] + b["activation_bytes"]
    assert "text decoder only" in r["params"]["counted"]


def test_released_variants_are_the_fourteen_without_tiny():
    released = configs.names(tiny=False)
    assert len(released) == 14 and not any(n.endswith("-tiny") for n in released)


@pytest.mark.parametrize("text, tokens", [("128k", 131072), ("4K", 4096), ("131072", 131072), (2048, 2048)])
def test_context_accepts_k_suffix(text, tokens):
    assert planner.parse_context(text) == tokens


@pytest.mark.parametrize("text", ["1.5k", "0", "12x", "k", "-4"])
def test_context_refuses_what_is_not_tokens(text):
    with pytest.raises(PlanError):
        planner.parse_context(text)


def test_context_over_the_models_maximum_is_refused():
    assert plan("gemma-3-1b", context=32768)["context"] == 32768
    with pytest.raises(PlanError, match="takes 1 to 32,768 tokens"):
        plan("gemma-3-1b", context=32769)


@pytest.mark.parametrize("kwargs", [{"weights": "int3"}, {"kv": "q4"}, {"model": "gemma-3-1b-tiny"},
                                    {"model": "gemma-9"}, {"batch": 0}])
def test_bad_inputs_are_plan_errors(kwargs):
    with pytest.raises(PlanError):
        plan(**{"model": "gemma-3-1b", **kwargs})


def test_dtype_aliases_name_the_same_dtype():
    assert plan("gemma-3-1b", "bf16", "fp16")["kv"] == "float16"
    assert plan("gemma-3-1b", "BF16")["weights"] == plan("gemma-3-1b", "bfloat16")["weights"] == "bfloat16"


# --- cards ---------------------------------------------------------------------------------------------


def test_gpu_memory_is_what_nvidia_smi_reports():
    gpus = planner.load_gpus()
    assert gpus["h100-80gb"]["usable_bytes"] == 81559 * MIB
    assert gpus["rtx-4090-24gb"]["mib"] == 24564
    assert gpus["rtx-4070-ti-12gb"]["mib"] < 13 * 1024 < gpus["rtx-4070-ti-super-16gb"]["mib"]
    assert all(card["source"] and card["name"] for card in gpus.values())


def test_package_data_ships_the_yaml_files():
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["harness"]
    assert "data/*.yaml" in data


def test_cards_needed_by_hand():
    g = GIB
    assert planner.cards_needed(70 * g, 1 * g, 80 * g) == 1
    assert planner.cards_needed(100 * g, 1 * g, 80 * g) == 2  # 99 / 79 -> 2
    assert planner.cards_needed(160 * g, 1 * g, 80 * g) == 3  # 159 / 79 > 2: each card pays its own context
    assert planner.cards_needed(10 * g, 1 * g, 0.5 * g) == math.inf


def test_verdict_headroom_and_fit():
    r = plan("gemma-3-1b", "bf16", "bf16", 4096)
    fits = planner.verdict(r, {"key": "big", "name": "Big", "usable_bytes": 64 * GIB})
    short = planner.verdict(r, {"key": "small", "name": "Small", "usable_bytes": 2 * GIB})
    assert fits["fits"] and fits["headroom_bytes"] == pytest.approx(64 * GIB - r["total_bytes"])
    assert not short["fits"] and short["headroom_bytes"] < 0 and short["cards_needed"] >= 2


# --- CLI ---------------------------------------------------------------------------------------------


def _run(capsys, *args):
    code = main(["plan", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_plan_json_has_total_and_breakdown(tmp_path, capsys):
    path = tmp_path / "p.json"
    code, out, err = _run(capsys, "--model", "gemma-3-1b", "--weights", "int4", "--kv", "bf16", "--context",
                          "4K", "--device", "t4-16gb", "--json", path)
    assert code == 0, err
    data = json.loads(path.read_text())
    assert data["total_bytes"] == pytest.approx(plan("gemma-3-1b", "int4", "bf16", 4096)["total_bytes"])
    assert {"weights_bytes", "kv_minimal_bytes", "kv_stored_bytes", "activation_bytes",
            "overhead_bytes"} <= set(data["breakdown"])
    assert [v["gpu"] for v in data["verdicts"]] == ["t4-16gb"] and data["verdicts"][0]["fits"]
    assert "assumptions:" in out and "T4 16GB" in out


def test_cli_plan_exits_0_when_it_does_not_fit(capsys):
    code, out, _ = _run(capsys, "--model", "gemma-4-31b", "--device", "rtx-4060-8gb")
    assert code == 0 and "does not fit" in out


def test_cli_plan_without_device_lists_every_card(capsys):
    code, out, _ = _run(capsys, "--model", "gemma-3-270m")
    assert code == 0
    assert all(card["name"] in out for card in planner.load_gpus().values())


@pytest.mark.parametrize("args", [("--context", "300k"), ("--context", "12x"), ("--device", "h900"),
                                  ("--weights", "int3"), ("--kv", "q4"), ("--ple-offload",)])
def test_cli_plan_bad_input_exits_2_with_one_line(capsys, args):
    code, out, err = _run(capsys, "--model", "gemma-4-31b", *args)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and not out


def test_cli_plan_needs_a_model_or_claims(capsys):
    assert _run(capsys)[0] == 2
    code, _, err = _run(capsys, "--claims", "--model", "gemma-3-1b")
    assert code == 2 and "--model" in err
    code, _, err = _run(capsys, "--claims", "--batch", "0")
    assert code == 2 and "--batch" in err


# --- published claims -----------------------------------------------------------------------------------

WORDS = ("holds", "holds only with minimal KV", "holds only with PLE offload", "does not hold")


def _claim(**changes):
    base = {"id": "synthetic", "source": "test", "line": 1, "quote": "q", "model": "gemma-4-31b",
            "weights": "int4", "kv": "bf16", "context": 131072, "claimed": "x", "hardware": {"gpu": "card"}}
    return {**base, **changes}


def _cards(**sizes):
    return {k: {"key": k, "name": k, "mib": v / MIB, "usable_bytes": v} for k, v in sizes.items()}


def test_claims_verdicts_follow_the_figures_huge_card_holds_tiny_card_does_not():
    huge, tiny = _cards(card=10_000 * GIB), _cards(card=2 * GIB)
    assert planner.check_claim(_claim(), huge)["verdict"] == "holds"
    assert planner.check_claim(_claim(), tiny)["verdict"] == "does not hold"


def test_claims_count_overstated_minimal_kv_and_ple_offload():
    r = plan("gemma-4-31b", "int4", "bf16", 131072)
    two = _claim(hardware={"gpu": "card", "count": 2})
    assert planner.check_claim(two, _cards(card=r["total_bytes"] + GIB))["verdict"].startswith("holds, overstated")
    assert planner.check_claim(two, _cards(card=r["total_stored_kv_bytes"] * 0.6))["verdict"] == "holds"
    between = (r["total_bytes"] + r["total_stored_kv_bytes"]) / 2
    assert planner.check_claim(_claim(), _cards(card=between))["verdict"] == "holds only with minimal KV"
    e4b = _claim(model="gemma-4-e4b", weights="fp16", kv="fp16", context=4096)
    full, off = plan("gemma-4-e4b", "fp16", "fp16", 4096), plan("gemma-4-e4b", "fp16", "fp16", 4096, ple_offload=True)
    row = planner.check_claim(e4b, _cards(card=(full["total_bytes"] + off["total_bytes"]) / 2))
    assert row["verdict"] == "holds only with PLE offload" and "PLE table on the host" in row["why"]


def test_budget_claims_are_in_decimal_gigabytes():
    """gemma-3-1b (no PLE, no K=V) against budgets just above and below its total in 10^9 bytes."""
    r = plan("gemma-3-1b", "int4", "bf16", 4096)
    gb = r["total_bytes"] / 1e9
    for budget, word in ((gb * 1.01, "holds"), (gb * 0.99, "does not hold")):
        claim = _claim(model="gemma-3-1b", context=4096, hardware={"budget_gb": budget})
        assert planner.check_claim(claim)["verdict"] == word


def test_claim_overrides_change_the_assumptions_they_name():
    free = _claim(model="gemma-3-4b", context=4096, hardware={"budget_gb": 3}, overrides={"runtime_fixed_gib": 0})
    plain = {**free, "overrides": {}}
    gap = planner.check_claim(plain)["total_bytes"] - planner.check_claim(free)["total_bytes"]
    assert gap == pytest.approx(GIB)


def test_overhead_sensitivity_marks_verdicts_that_hang_on_the_overhead():
    r = plan("gemma-3-1b", "int4", "bf16", 4096)
    low = r["total_bytes"] - r["breakdown"]["overhead_bytes"] + 0.5 * GIB  # 0.5 GiB + 0 %: below the default total
    claim = _claim(model="gemma-3-1b", context=4096)
    shaky = planner.check_claim(claim, _cards(card=(low + r["total_bytes"]) / 2))
    assert shaky["verdict"] == "does not hold" and shaky["overhead_sensitivity"]["low"] == "holds"
    assert not shaky["robust"] and "low overhead: holds" in planner._cell(shaky)
    steady = planner.check_claim(claim, _cards(card=64 * GIB))
    assert steady["robust"] and planner._sensitive(steady) == ""


def test_every_checkable_published_claim_has_a_derived_verdict():
    report = planner.check_claims()
    rows = report["claims"]
    checkable = [r for r in rows if r["checkable"]]
    assert len(checkable) >= 12 and len(rows) > len(checkable)
    for r in checkable:
        assert r["verdict"] in WORDS or r["verdict"].startswith("holds, overstated"), r
        assert f"{r['total_bytes'] / GIB:.2f} GiB" in r["why"]
        a = replace(Assumptions(), **(r["overrides"] or {}))
        total = plan(r["model"], r["weights"], r["kv"], r["context"], assumptions=a)["total_bytes"]
        if r["count"] == 1:  # one card: fits when the total is at most its memory
            fits = total <= r["usable_bytes"]
        else:  # each card pays the fixed runtime overhead, the rest splits
            fixed = a.runtime_fixed_gib * GIB
            fits = (total - fixed) <= r["count"] * (r["usable_bytes"] - fixed)
        if fits:
            assert r["verdict"].startswith("holds") and r["verdict"] != "holds only with PLE offload", r["id"]
        else:
            assert r["verdict"] in ("does not hold", "holds only with PLE offload"), r["id"]
    assert all(r["verdict"].startswith("not checkable") for r in rows if not r["checkable"])
    assert {"harness_version", "git_commit"} <= set(report["environment"])


def test_claims_markdown_regenerates_the_seed_table_in_its_layout():
    report = planner.check_claims()
    text = planner.claims_markdown(report)
    table = planner.seed_table(report["claims"])
    assert table[0] == "| Configuration | 31B | 26B-A4B | E2B |"
    assert [line.split(" | ")[0] for line in table[2:]] == ["| FP16, 4K ctx", "| INT4, 4K ctx", "| INT4, 128K ctx"]
    assert all(line.count("computed") == 3 for line in table[2:])
    assert "minimal" in text and report["environment"]["git_commit"] in text


def test_claims_file_quotes_the_seeds_at_the_cited_lines():
    if not SEEDS.is_dir():
        pytest.skip("shared/seeds not present")
    claims = yaml.safe_load((ROOT / "harness" / "data" / "claims.yaml").read_text())["claims"]
    for c in claims:
        lines = (SEEDS / c["source"]).read_text(encoding="utf-8").splitlines()
        assert c["quote"] in lines[c["line"] - 1], c["id"]
        if c.get("checkable", True):
            planner.released(c["model"])
            assert planner.gpu(c["hardware"]["gpu"]) if "gpu" in c["hardware"] else c["hardware"]["budget_gb"] > 0


def test_cli_claims_writes_markdown_and_json(tmp_path, capsys):
    code, out, err = _run(capsys, "--claims", "--md", tmp_path / "h.md", "--json", tmp_path / "h.json")
    assert code == 0, err
    data = json.loads((tmp_path / "h.json").read_text())
    assert len(out.splitlines()) == len(data["claims"])
    assert "| Configuration | 31B | 26B-A4B | E2B |" in (tmp_path / "h.md").read_text()
