"""The property suites catch what the gate cannot: a cache that is wrong only after the sliding window
wraps, and (again) a padding-mask bug — named by layer, and replayable with one command."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import configs
from harness.adapters import resolve
from harness.gate import conform
from harness.synthetic import make_batch, random_state_dict
from reference_impl.spec import ModelSpec
from suites import strategies as S
from suites.checks import decode_divergence, padding_divergence
from tests import mutants
from tests.mutants_cache import G2SlidingCacheWrapBug

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent


def _loaded(candidate, model):
    cfg = configs.hf_config(model)
    spec = ModelSpec.from_hf_config(cfg)
    adapter = resolve(candidate)
    adapter.load(cfg, random_state_dict(spec), torch.float32)
    return adapter, spec


def test_cache_wrap_bug_passes_the_gate_but_fails_decode_after_the_wrap():
    cls = G2SlidingCacheWrapBug
    assert conform(cls.MODEL, candidate=cls).passed  # its full forward is HF's: the gate cannot see it
    adapter, spec = _loaded(cls, cls.MODEL)
    w = spec.max_window
    before_wrap = make_batch(spec, length=w - 1)
    assert decode_divergence(adapter, spec, before_wrap, [1] * (w - 1)) is None
    batch = make_batch(spec)
    first = decode_divergence(adapter, spec, batch, [w - 2] + [1] * (batch.input_ids.shape[1] - w + 2))
    assert first is not None and first.name == cls.EXPECTED, first


@pytest.mark.parametrize("candidate", ["hf", "reference"])
def test_correct_caches_decode_like_the_full_forward(candidate):
    adapter, spec = _loaded(candidate, "gemma-2-2b-tiny")
    batch = make_batch(spec)
    n, w = batch.input_ids.shape[1], spec.max_window
    steps = [w - 2] + [1] * (n - w + 2)  # a prefill inside the window, then single tokens past it
    large = [w + 3] * (n // (w + 3)) + [n % (w + 3)]  # chunks larger than the window
    for chunks in (steps, [c for c in large if c]):
        assert sum(chunks) == n
        assert decode_divergence(adapter, spec, batch, chunks) is None


def test_padding_bug_is_seen_by_the_padding_property():
    bad, spec = _loaded(mutants.G1IgnoresPadding, mutants.G1IgnoresPadding.MODEL)
    good, _ = _loaded("hf", mutants.G1IgnoresPadding.MODEL)
    batch = make_batch(spec)
    first = padding_divergence(bad, spec, batch)
    assert first is not None and first.name == "layers.0.attn", first
    assert padding_divergence(good, spec, batch) is None


def _suite(*args):
    return subprocess.run([sys.executable, "-m", "pytest", "suites/test_properties.py", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_suite_run_against_the_cache_bug_fails_naming_the_layer_and_replay():
    proc = _suite("-k", "decode", "--candidate", "tests.mutants_cache:G2SlidingCacheWrapBug")
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "diverges from the full forward first at layers.0.attn" in proc.stdout
    assert "-m pytest suites/test_properties.py::test_decode_matches_full_forward" in proc.stdout


def test_suite_run_against_hf_passes():
    proc = _suite("-k", "decode or padding", "--candidate", "transformers:Gemma2ForCausalLM")
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_replay_line_names_interpreter_path_and_replays_the_stored_example(tmp_path):
    """The replay command runs the same interpreter from the same directory with the PYTHONPATH the
    candidate needed, and hypothesis replays the stored failing example first (the database is on)."""
    proc = _suite("-k", "decode", "--candidate", "tests.mutants_cache:G2SlidingCacheWrapBug")
    assert proc.returncode == 1
    replay = next(line for line in proc.stdout.splitlines() if " -m pytest " in line and "cd " in line)
    assert sys.executable in replay and f"PYTHONPATH={ROOT}" in replay, replay
    assert "--candidate tests.mutants_cache:G2SlidingCacheWrapBug" in replay
    rerun = subprocess.run(replay + " -q -p no:cacheprovider", shell=True, capture_output=True, text=True,
                           timeout=600, cwd=tmp_path)
    assert rerun.returncode == 1 and "diverges from the full forward first at layers.0.attn" in rerun.stdout
    assert "Failing test case" in rerun.stdout


@pytest.mark.parametrize("ci_variable", ["CI", "GITHUB_ACTIONS"])
def test_profiles_keep_the_database_on_a_ci_machine(ci_variable):
    """Where a CI variable is set, hypothesis makes its own "ci" profile (no database, derandomized) the
    default; the suite's profiles must not inherit it, or the replay line replays nothing (this failed
    only on the CI machine)."""
    code = ("import suites.plugin; from hypothesis import settings; "
            "print([(settings.get_profile(p).database is not None, settings.get_profile(p).derandomize) "
            "for p in ('ci', 'replay', 'nightly')])")
    env = {**os.environ, ci_variable: "true"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str([(True, False)] * 3)


def test_port_without_padding_has_padding_unsupported_and_the_rest_judged():
    proc = _suite("-rs", "--candidate", "tests.ports:Gemma2RejectsPadding")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "padding: unsupported — tests.ports:Gemma2RejectsPadding: NotImplementedError: left padding is not " \
           "supported" in proc.stdout, proc.stdout[-3000:]
    # skipped: the padding property, and the two image-text properties of each image-text family (gemma3, gemma4,
    # gemma3n): a Gemma 2 port builds no image-text model
    n_mm = 2 * len(S.MULTIMODAL_FAMILIES)
    assert f"5 passed, {1 + n_mm} skipped" in proc.stdout, proc.stdout[-1000:]
    assert f"SKIPPED [{n_mm}] suites/test_properties.py" in proc.stdout and "builds no image-text model" in proc.stdout, proc.stdout[-1000:]


def test_port_without_position_ids_is_judged_on_every_property():
    proc = _suite("--candidate", "tests.ports:Gemma3NoPositionIds")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "6 passed" in proc.stdout or "5 passed, 1 skipped" in proc.stdout, proc.stdout[-1000:]


def test_refused_decode_schedules_do_not_hide_a_cache_bug():
    """The port's cache refuses prefills longer than its window (NotImplementedError) and is wrong after
    the window wraps: the refusals are counted as unsupported and the search still finds the bug."""
    proc = _suite("-k", "decode", "--candidate", "tests.ports:Gemma2RefusesLongPrefill")
    assert proc.returncode == 1, proc.stdout[-3000:]
    failure = re.search(r"E +AssertionError: tests.ports:Gemma2RefusesLongPrefill: cached decode .*", proc.stdout)
    assert failure and "diverges from the full forward first at layers.0.attn" in failure[0], proc.stdout[-3000:]
    assert re.search(r"\((\d+) drawn schedules refused as unsupported\)", failure[0]), failure[0]
    assert not re.search(r"^E +NotImplementedError", proc.stdout, re.M)  # a refusal is never the reported failure


def test_decode_strategies_spend_their_draws_where_the_window_bites():
    """At least 9 in 10 drawn decode cases of the windowed generations have a sliding layer and a row
    longer than the window (before, about 4 in 10 Gemma 3 cases could not exercise the window)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    def share_that_bites(family: str) -> tuple[int, int]:
        bites = []

        @settings(max_examples=200, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def draw(data):
            cfg = data.draw(S.any_config((family,), windowed=True))
            batch = data.draw(S.batches(cfg, max_factor=4, past_window=True))
            bites.append(S.bites_the_window(cfg, batch))

        draw()
        return sum(bites), len(bites)

    for family in S.WINDOWED:
        hits, draws = share_that_bites(family)
        assert hits >= 0.9 * draws, f"{family}: {hits} of {draws} draws bite the window"


def test_gemma3n_strategies_draw_what_hf_and_the_reference_accept():
    """Every drawn Gemma 3n config (text, and image-audio-text) is one HF's config classes and the reference's spec
    take, with a legal KV-shared tail, a full layer, some activation sparsity; its media batches put
    ``vision_soft_tokens_per_image`` placeholders per image and ``audio_soft_tokens_per_image`` per clip, and
    each batch's clips give the audio tower no more frames than that (HF pads up to it, and fails past it)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from harness.adapters.hf import hf_config_object
    from reference_impl import audio

    seen = {"audio": 0, "shared": 0}

    @settings(max_examples=30, database=None, derandomize=True, suppress_health_check=list(HealthCheck), deadline=None)
    @given(data=st.data())
    def draw(data):
        cfg = data.draw(S.multimodal_config(("gemma3n",)))
        text = cfg["text_config"]
        hf = hf_config_object(cfg)
        assert hf.text_config.kv_sharing_modes.count("reuse") == text["num_kv_shared_layers"]
        assert S.FULL in text["layer_types"] and any(text["activation_sparsity_pattern"])
        spec = ModelSpec.from_hf_config(cfg)
        assert len(spec.layers) == text["num_hidden_layers"] and spec.gemma3n is not None
        mm = spec.multimodal
        batch = data.draw(S.media_batches(cfg))
        ids = batch.input_ids
        assert int((ids == mm.image_token_id).sum()) == mm.vision_tokens * batch.pixel_values.shape[0]
        assert batch.pixel_values.shape[-1] == 48 * math.isqrt(mm.vision_tokens)
        assert int((ids[batch.attention_mask.bool()] >= mm.vision_offset).sum()) == int(
            (ids == mm.image_token_id).sum() + (ids == mm.eoi_token_id).sum() + (ids == mm.audio_token_id).sum()
            + (ids == mm.eoa_token_id).sum())  # the only hard media ids are the placeholders and <eoi>/<eoa>
        if batch.audio_features is not None:
            seen["audio"] += 1
            clips = batch.audio_features.shape[0]
            assert int((ids == mm.audio_token_id).sum()) == mm.audio_tokens * clips
            assert S._gemma3n_tower_frames(batch.audio_features.shape[1], cfg["audio_config"]) <= mm.audio_tokens
        seen["shared"] += bool(text["num_kv_shared_layers"])

    draw()
    assert seen["audio"] and seen["shared"], seen
    for samples in (600, 2000, 5120, 5632, 7000, 12000):  # the helper against the feature extractor's frame count
        features, _ = audio.batch_features_3n([torch.zeros(samples).numpy()])
        config = {"sscp_conv_stride_size": [[2, 2], [2, 2]], "conf_reduction_factor": 4}
        assert S.gemma3n_clip_tokens(samples, config) == S._gemma3n_tower_frames(features.shape[1], config), samples
