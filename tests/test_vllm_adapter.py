"""The vLLM adapter's plumbing, without vLLM: model directory and tokenizer, config variant, row
assembly, process isolation (crash, kill, hang), and the greedy-decode judgement."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

import configs
from harness import model_dir
from harness.adapters import ReferenceAdapter, resolve
from harness.adapters.base import last_error_line
from harness.adapters.vllm import MIN_HEAD_DIM, VLLMAdapter
from harness.decode_check import judge_greedy
from harness.gate import conform
from harness.synthetic import Batch, make_batch, random_state_dict
from harness.tolerance import tolerance_for
from reference_impl.spec import ModelSpec

TWINS = configs.names(tiny=True)


def test_model_dir_round_trips_config_and_weights(tmp_path):
    cfg = configs.hf_config("gemma-3-270m-tiny")
    state = random_state_dict(ModelSpec.from_hf_config(cfg), seed=3)
    path = model_dir.write_model_dir(tmp_path / "m", cfg, state, torch.bfloat16)
    written = json.loads((path / "config.json").read_text())
    assert {k: written[k] for k in cfg} == cfg and written["torch_dtype"] == "bfloat16"
    assert written["architectures"] == ["Gemma3ForCausalLM"]
    bare = {k: v for k, v in cfg.items() if k != "architectures"}  # e.g. a config drawn by the suites
    assert json.loads((model_dir.write_model_dir(tmp_path / "b", bare, state) / "config.json").read_text())[
        "architectures"] == ["Gemma3ForCausalLM"]
    loaded = load_file(str(path / "model.safetensors"))
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k].to(torch.bfloat16)) for k in state)


@pytest.mark.parametrize("name", ["gemma-2b-tiny", "gemma-4-e2b-tiny"])
def test_tokenizer_maps_every_id_and_back(tmp_path, name):
    tokenizers = pytest.importorskip("tokenizers")
    cfg = configs.hf_config(name)
    model_dir.write_tokenizer(tmp_path, cfg)
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == cfg["vocab_size"]
    ids = list(range(cfg["vocab_size"]))
    text = tok.decode(ids, skip_special_tokens=False)
    assert tok.encode(text).ids == ids
    special = model_dir.special_ids(cfg)
    assert tok.token_to_id("<bos>") == special["bos_token_id"] and tok.token_to_id("<pad>") == special["pad_token_id"]


def test_tokenizer_loads_through_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = configs.hf_config("gemma-2-2b-tiny")
    model_dir.write_tokenizer(tmp_path, cfg)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok("<bos> <t7> <t511>")["input_ids"] == [2, 7, 511]
    assert tok.bos_token_id == 2 and tok.eos_token_id == 1 and tok.pad_token_id == 0


def test_tokenizer_is_deterministic(tmp_path):
    pytest.importorskip("tokenizers")
    cfg = configs.hf_config("gemma-3-1b-tiny")
    for name, config in (("a", cfg), ("b", dict(cfg))):
        (tmp_path / name).mkdir()
        model_dir.write_tokenizer(tmp_path / name, config)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("name", TWINS)
def test_vllm_variant_has_head_sizes_vllm_accepts(name):
    adapter = VLLMAdapter()
    cfg = adapter.prepare_config(configs.hf_config(name))
    spec = ModelSpec.from_hf_config(cfg)
    assert all(layer.head_dim >= MIN_HEAD_DIM for layer in spec.layers)
    original = ModelSpec.from_hf_config(configs.hf_config(name))
    # only the head size changes: the layer pattern, windows and head counts stay the twin's
    assert [(lyr.attention, lyr.window, lyr.num_heads, lyr.num_kv_heads) for lyr in spec.layers] == \
        [(lyr.attention, lyr.window, lyr.num_heads, lyr.num_kv_heads) for lyr in original.layers]
    assert "head_dim 16->32" in adapter.config_note
    if original.layers[-1].head_dim != original.layers[0].head_dim:  # Gemma 4: global layers keep a wider head
        assert spec.layers[-1].head_dim == 2 * spec.layers[0].head_dim == 64


@pytest.mark.parametrize("head_dim, expected", [(8, 32), (16, 32), (24, 64), (32, 32), (48, 64), (72, 80), (256, 256)])
def test_vllm_variant_head_size(head_dim, expected):
    cfg = VLLMAdapter().prepare_config({**configs.hf_config("gemma-2b-tiny"), "head_dim": head_dim})
    assert cfg["head_dim"] == expected


def test_vllm_variant_moe_hidden_size():
    adapter = VLLMAdapter()
    cfg = adapter.prepare_config({**configs.hf_config("gemma-4-26b-a4b-tiny"), "hidden_size": 48})
    assert cfg["hidden_size"] == 64 and "hidden_size 48->64" in adapter.config_note
    dense = adapter.prepare_config({**configs.hf_config("gemma-4-31b-tiny"), "hidden_size": 48})
    assert dense["hidden_size"] == 48  # only the MoE kernel needs it


def test_rows_are_sent_unpadded_and_put_back_in_place():
    spec = ModelSpec.from_hf_config(configs.hf_config("gemma-2b-tiny"))
    batch = make_batch(spec, seed=0)
    prompts = batch.prompts()
    assert len(prompts[0]) == batch.input_ids.shape[1] and len(prompts[1]) == batch.input_ids.shape[1] - 5
    rows = [{"x": torch.tensor(p, dtype=torch.float32)[:, None]} for p in prompts]
    out = VLLMAdapter._assemble(batch, rows)["x"][..., 0]
    assert torch.equal(out[batch.valid], batch.input_ids[batch.valid].float())


def test_resolve_names_vllm():
    assert isinstance(resolve("vllm"), VLLMAdapter)


def _fake_python(tmp_path, body: str) -> str:
    script = tmp_path / "python"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@pytest.mark.parametrize("body, expected", [
    ("echo 'Traceback (most recent call last):' >&2; echo 'ValueError: Gemma9ForCausalLM is not supported' >&2; exit 1",
     "vllm failed (exit code 1): ValueError: Gemma9ForCausalLM is not supported"),
    ("kill -9 $$", "vllm failed (killed by signal 9)"),
    ("exit 0", "vllm failed (exit code 0): no output"),
])
def test_a_crashing_vllm_is_that_runs_error(tmp_path, body, expected):
    result = conform("gemma-2b-tiny", candidate=VLLMAdapter(python=_fake_python(tmp_path, body)))
    assert not result.passed and result.error.startswith(expected), result.error
    assert "head_dim 16->32" in result.inputs


def test_a_hanging_vllm_is_killed(tmp_path):
    result = conform("gemma-2b-tiny", candidate=VLLMAdapter(python=_fake_python(tmp_path, "sleep 30"), timeout_s=1))
    assert result.error == "vllm: no result after 1 s (killed)"


def test_missing_vllm_is_reported_not_raised():
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    result = conform("gemma-2b-tiny", candidate="vllm")
    assert result.error and "No module named 'vllm'" in result.error


def test_crash_keeps_earlier_results_and_exits_1(tmp_path):
    from harness import cli

    out = tmp_path / "r.json"
    fake = _fake_python(tmp_path, "echo 'RuntimeError: engine died' >&2; exit 3")
    os.environ["GEMMA_HARNESS_VLLM_PYTHON"] = fake
    try:
        code = cli.main(["conform", "--model", "gemma-2b-tiny", "--model", "gemma-3-1b-tiny", "--against", "vllm",
                         "--json", str(out), "--quiet"])
    finally:
        del os.environ["GEMMA_HARNESS_VLLM_PYTHON"]
    assert code == 1
    results = json.loads(out.read_text())["results"]
    assert [r["model"] for r in results] == ["gemma-2b-tiny", "gemma-3-1b-tiny"]
    assert all(r["error"] == "vllm failed (exit code 3): RuntimeError: engine died" for r in results)


def test_last_error_prefers_the_exception_line():
    log = "INFO starting\nTraceback (most recent call last):\n  File x\nKeyError: 'model.norm.weight'\nINFO shutdown\n"
    assert last_error_line(log) == "KeyError: 'model.norm.weight'"
    pydantic = ("pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
                "  Value error, Model architectures ['X'] are not supported [type=value_error]\n"
                "    For further information visit https://errors.pydantic.dev\nINFO exit\n")
    assert last_error_line(pydantic) == ("pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig "
                                     "Value error, Model architectures ['X'] are not supported [type=value_error] "
                                     "For further information visit https://errors.pydantic.dev")
    assert last_error_line("") == "no output"


class _Greedy:
    """The reference as a generating candidate: greedy tokens and log-probs from a full forward each step."""

    def __init__(self, reference, perturb=0.0, wrong_token=False):
        self.reference, self.perturb, self.wrong_token = reference, perturb, wrong_token

    def generate(self, prompts, steps):
        out = []
        for prompt in prompts:
            ids, lps = list(prompt), []
            for _ in range(steps):
                x = torch.tensor([ids])
                batch = Batch(x, torch.ones_like(x), torch.arange(len(ids))[None])
                lp = torch.log_softmax(self.reference.run(batch)["logits"][0, -1].float(), -1)
                lp = lp + self.perturb * torch.linspace(-1, 1, lp.shape[0])
                token = int(lp.argsort()[-2]) if self.wrong_token else int(lp.argmax())
                lps.append(lp)
                ids.append(token)
            out.append((torch.tensor(ids[len(prompt):]), torch.stack(lps)))
        return out


@pytest.mark.parametrize("name", ["gemma-2-2b-tiny", "gemma-4-26b-a4b-tiny"])
def test_greedy_judgement(name):
    cfg = configs.hf_config(name)
    spec = ModelSpec.from_hf_config(cfg)
    reference = ReferenceAdapter()
    reference.load(cfg, random_state_dict(spec, 0), torch.float32)
    prompts = [p[:12] for p in make_batch(spec, 0).prompts()]
    tol = tolerance_for("float32", spec.family)

    right = judge_greedy(reference, prompts, _Greedy(reference).generate(prompts, 4), tol)
    assert right.status == "pass" and right.metrics["steps"] == 8 and right.metrics["greedy_flips"] == 0, right.note
    assert "tokens_flipped" not in right.metrics  # the verdict sums that one as MoE expert flips
    assert right.metrics["max_rel"] < 1e-5  # full forward vs cached decode: op order only

    off = judge_greedy(reference, prompts, _Greedy(reference, perturb=1e-2).generate(prompts, 4), tol)
    assert off.status == "fail" and "decode max_rel" in off.note

    sampler_bug = judge_greedy(reference, prompts, _Greedy(reference, wrong_token=True).generate(prompts, 4), tol)
    assert sampler_bug.status == "fail" and "not the argmax" in sampler_bug.note
