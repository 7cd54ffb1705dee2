"""gemma-harness: conformance gate and benchmark harness for Gemma implementations."""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata
from pathlib import Path

try:
    __version__ = metadata.version("gemma-harness")
except metadata.PackageNotFoundError:  # run from a checkout without installing
    __version__ = "0.0.0+checkout"

_ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def source_hash() -> str:
    """sha256 (first 12 hex digits) of the code that decides a result: the harness, the reference
    implementation and the config loader. Two runs with the same hash computed the same way."""
    digest = hashlib.sha256()
    for package in ("harness", "reference_impl", "configs"):
        for path in sorted((_ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def version_string() -> str:
    """``<package version>+<source hash>``: what a results file records as the harness that wrote it."""
    return f"{__version__}+{source_hash()}"
