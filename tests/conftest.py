import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # so tests can import `tests.mutants` and candidates by MODULE:OBJECT
    sys.path.insert(0, ROOT)
