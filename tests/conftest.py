import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # so tests can import `tests.mutants` and candidates by MODULE:OBJECT
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The tests run tiny models: intra-op threads only add spin and contention (up to 10x slower on a
    loaded 2-core machine). Subprocess tests (the CLI) are not affected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
