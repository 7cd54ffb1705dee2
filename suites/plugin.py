"""pytest plugin (registered through the package's ``pytest11`` entry point).

* ``--candidate MODULE:OBJECT`` — a port to hold to the property suites (the same forms as
  ``gemma-harness conform --candidate``). Without it the suites run the reference and HF Transformers.
* hypothesis profiles ``ci`` (bounded and seeded: the same examples on every run, unless
  ``--hypothesis-seed`` says otherwise) and ``nightly`` (200 fresh random examples per property and
  round; ``--nightly-minutes N`` keeps running rounds of each property until its share of N minutes is
  spent), chosen with hypothesis' own ``--hypothesis-profile``. The default is ``ci``. ``replay`` runs
  only the examples stored in the database (what the replay line below uses). All keep
  hypothesis' example database (``.hypothesis/`` in the working directory), so a failing example is
  stored and replayed first on the next run.

A failure prints hypothesis' shrunk minimal config and input, and a one-line replay command: the same
interpreter, working directory and ``PYTHONPATH`` (so the candidate imports again), which replays the
stored failing example before searching anything else.
"""

from __future__ import annotations

import os
import shlex
import sys
import time

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase

# The database and derandomize are named, not inherited: where a CI variable is set (CI, GITHUB_ACTIONS,
# ...) hypothesis loads its own "ci" profile as the default, with database=None and derandomize=True, and
# every profile registered below would inherit that: no failure would be stored, and the replay line
# would replay nothing.
# Not derandomize=True: that disables the example database, and with it the replay of a failure. The
# seed set in pytest_configure makes the draws as repeatable.
_COMMON = dict(database=DirectoryBasedExampleDatabase(".hypothesis/examples"), derandomize=False, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
               print_blob=True)
settings.register_profile("ci", max_examples=25, **_COMMON)
CI_SEED = 0
# Replays only what the example database holds (a stored failure), without searching for new examples.
settings.register_profile("replay", max_examples=25, phases=(Phase.explicit, Phase.reuse), **_COMMON)
settings.register_profile("nightly", max_examples=int(os.environ.get("GEMMA_NIGHTLY_EXAMPLES", "200")), **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    group = parser.getgroup("gemma-harness")
    group.addoption("--candidate", action="store", default=None, metavar="MODULE:OBJECT",
                    help="a Gemma port to test: an adapter, or a torch module class with the HF *ForCausalLM interface")
    group.addoption("--nightly-minutes", action="store", type=float, default=None,
                    help="with --hypothesis-profile=nightly: stop each property after about this many minutes")


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """The ``ci`` profile draws the same examples on every run: a fixed seed, unless one is given."""
    from hypothesis import core

    if settings.get_current_profile_name() == "ci" and core.global_force_seed is None:
        core.global_force_seed = CI_SEED


def keep_examples(test):
    """Give a hypothesis test its example database back: hypothesis drops it when the seed is fixed
    (as the ``ci`` profile does), and with it the replay of a stored failure."""
    from hypothesis.internal.reflection import function_digest

    inner = getattr(getattr(test, "hypothesis", None), "inner_test", None)
    if inner is not None:
        test._hypothesis_internal_database_key = function_digest(inner)
    return test


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    minutes = config.getoption("--nightly-minutes", default=None)
    properties = [item for item in items if item.nodeid.startswith("suites/")]
    for item in properties:
        keep_examples(getattr(item, "obj", None))
    for item in properties:
        item._gemma_budget_s = minutes * 60 / len(properties) if minutes else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """--nightly-minutes: after the first round of a property passes, run more rounds (fresh random
    examples each) until the property's share of the time is spent; a failing round fails the test."""
    budget = getattr(item, "_gemma_budget_s", None)
    start = time.monotonic()
    outcome = yield
    if not budget or outcome.excinfo is not None:
        return
    rounds = 1
    while time.monotonic() - start < budget:
        item.runtest()
        rounds += 1
    item.user_properties.append(("rounds", rounds))
    item.config._gemma_rounds = getattr(item.config, "_gemma_rounds", {}) | {item.name: (rounds, time.monotonic() - start)}


def pytest_terminal_summary(terminalreporter, config):
    rounds = getattr(config, "_gemma_rounds", {})
    if rounds:
        terminalreporter.section("nightly property rounds")
        for name, (n, seconds) in rounds.items():
            terminalreporter.line(f"{name}: {n} rounds x {settings().max_examples} examples in {seconds:.0f} s")


@pytest.fixture(scope="session")
def candidate_target(request):
    """The --candidate string, or None (then the suites run the reference and HF)."""
    return request.config.getoption("--candidate")


def _candidate_path(candidate: str | None) -> str:
    """The directory the candidate's module was imported from (what PYTHONPATH needs to hold), or '' for a
    built-in implementation (``hf``, ``litgpt``, ...) or a module not imported."""
    module_name, sep, _ = (candidate or "").partition(":")
    path = getattr(sys.modules.get(module_name), "__file__", None) if sep else None
    if not path:
        return ""
    root = os.path.dirname(os.path.abspath(path))
    levels = module_name.count(".") + (os.path.basename(path) == "__init__.py")
    for _ in range(levels):  # up from the module's folder to the one its top-level package sits in
        root = os.path.dirname(root)
    return root


def replay_command(nodeid: str, candidate: str | None) -> str:
    """The command that replays a failed property: same directory (the example database lives there),
    interpreter and PYTHONPATH; hypothesis tries the stored failing example first."""
    paths = [p for p in [_candidate_path(candidate), os.environ.get("PYTHONPATH", "")] if p]
    env = f"PYTHONPATH={shlex.quote(os.pathsep.join(paths))} " if paths else ""
    cmd = f"cd {shlex.quote(os.getcwd())} && {env}{shlex.quote(sys.executable)} -m pytest {shlex.quote(nodeid)}"
    return cmd + (f" --candidate {shlex.quote(candidate)}" if candidate else "") + " --hypothesis-profile=replay"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failed property, add the one command that replays it: hypothesis keeps the shrunk failing
    example in its database (.hypothesis/) and tries it first on the next run."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and item.nodeid.startswith("suites/"):
        report.sections.append(("replay", replay_command(item.nodeid, item.config.getoption("--candidate"))))
