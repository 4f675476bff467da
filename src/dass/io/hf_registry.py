"""What a compressed checkpoint's ``config.json`` says, and registering the quantizer
that reads it with transformers as soon as transformers can use it.

``import dass`` must stay cheap (the CLI imports it for ``--help``), and importing
transformers' quantizer registry takes seconds, so :mod:`dass.io.hf_quantizer` is
imported only when transformers itself imports its registry
(``transformers.quantizers.auto``, which every ``from_pretrained`` needs), or at once if
transformers already did. Importing this module installs that hook; the hook removes
itself after it has fired.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any

_REGISTRY = "transformers.quantizers.auto"

#: ``quant_method`` of a compressed checkpoint: transformers names it when it cannot load
#: the checkpoint (dass not imported).
QUANT_METHOD = "dass"
#: For whoever opens ``config.json`` without dass.
REQUIRES = "pip install dass, then `import dass` before from_pretrained"


def quantizer_entry(file: str) -> dict[str, str]:
    """The ``quantization_config`` that routes ``from_pretrained`` to
    :class:`dass.io.hf_quantizer.DassNMQuantizer` for the compressed weights in ``file``."""
    from dass.io.sparse_format import FORMAT_NAME

    return {"quant_method": QUANT_METHOD, "format": FORMAT_NAME, "file": file, "requires": REQUIRES}


def _register() -> None:
    from dass.io.hf_quantizer import register

    register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of the registry module so that dass'
    quantizer is registered right after that module has run."""

    def find_spec(self, fullname: str, path: Any, target: Any = None):
        if fullname != _REGISTRY:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            uninstall()
            _register()

        spec.loader.exec_module = exec_module  # this spec's loader only
        return spec


_HOOK = _RegisterAfterImport()


def uninstall() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install() -> None:
    """Register now if transformers' registry is loaded, else when it loads."""
    if _REGISTRY in sys.modules:
        _register()
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


install()
