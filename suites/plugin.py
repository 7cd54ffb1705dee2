"""pytest plugin (registered through the package's ``pytest11`` entry point).

* ``--candidate MODULE:OBJECT`` — a port to hold to the property suites (the same forms as
  ``gemma-harness conform --candidate``). Without it the suites run the reference and HF Transformers.
* hypothesis profiles ``ci`` (bounded, derandomised: the same examples on every run) and ``nightly``
  (200 fresh random examples per property and round; ``--nightly-minutes N`` keeps running rounds of
  each property until its share of N minutes is spent), chosen with hypothesis' own
  ``--hypothesis-profile``. The default is ``ci``.

A failure prints hypothesis' shrunk minimal config and input, and a one-line replay command.
"""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
               print_blob=True)
settings.register_profile("ci", max_examples=25, derandomize=True, **_COMMON)
settings.register_profile("nightly", max_examples=int(os.environ.get("GEMMA_NIGHTLY_EXAMPLES", "200")), **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    group = parser.getgroup("gemma-harness")
    group.addoption("--candidate", action="store", default=None, metavar="MODULE:OBJECT",
                    help="a Gemma port to test: an adapter, or a torch module class with the HF *ForCausalLM interface")
    group.addoption("--nightly-minutes", action="store", type=float, default=None,
                    help="with --hypothesis-profile=nightly: stop each property after about this many minutes")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    minutes = config.getoption("--nightly-minutes", default=None)
    properties = [item for item in items if item.nodeid.startswith("suites/")]
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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failed property, add the one command that replays it: hypothesis keeps the shrunk failing
    example in its database (.hypothesis/) and tries it first on the next run."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and item.nodeid.startswith("suites/"):
        candidate = item.config.getoption("--candidate")
        cmd = f"python -m pytest '{item.nodeid}'" + (f" --candidate {candidate}" if candidate else "")
        report.sections.append(("replay", cmd))
