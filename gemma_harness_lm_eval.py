"""Makes ``lm_eval --model gemma-harness`` work in this environment.

lm-eval 0.4.13 finds models only in its own ``MODEL_MAPPING`` (its registry has no entry-point
discovery), so a model from another package is known only in a process that imported it first. This
module, imported at interpreter start by ``gemma_harness_lm_eval.pth`` (written by
``gemma-harness eval --register-lm-eval``), waits for ``lm_eval.api.registry`` to be imported and then
registers ``gemma-harness`` as a lazy placeholder (``harness.lmeval.lm:GemmaHarnessLM``) beside
lm-eval's own models. It imports nothing but the standard library until lm-eval itself is imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

REGISTRY = "lm_eval.api.registry"
NAME, TARGET = "gemma-harness", "harness.lmeval.lm:GemmaHarnessLM"
PTH_NAME = "gemma_harness_lm_eval.pth"


def register() -> None:
    """Register the placeholder (and lm-eval's own models, which a non-empty registry would skip)."""
    import lm_eval.models  # noqa: F401 - lm-eval's MODEL_MAPPING placeholders
    from lm_eval.api.registry import model_registry

    if NAME not in model_registry:
        model_registry.register(NAME, target=TARGET)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        register()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def hook() -> None:
    if REGISTRY in sys.modules:
        register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def install(site_dir: str | None = None) -> str:
    """Write the .pth into this interpreter's site-packages (or ``site_dir``); its path."""
    import os
    import sysconfig

    target = os.path.join(site_dir or sysconfig.get_paths()["purelib"], PTH_NAME)
    with open(target, "w") as f:
        f.write("import gemma_harness_lm_eval; gemma_harness_lm_eval.hook()\n")
    return target
