"""Registering GranAlign with transformers' Auto classes as soon as they can be used, and no sooner.

Registering (`AutoConfig`, `AutoModel`, `AutoModelForZeroShotImageClassification`, `AutoProcessor`, the
`efficientnet_lite` tower, and `register_for_auto_class` so that saved checkpoints carry their code)
imports torch and transformers' model code: seconds, which `granalign --help` cannot pay. So
`import granalign` calls `install()`: it registers at once when the Auto classes are already imported,
else it adds an import hook that registers right after `transformers.models.auto.configuration_auto`
(which every Auto class and `pipeline` imports before reading its mapping) is first imported, as soon as
no `transformers` or `granalign` module is still executing in that thread. `register_auto_classes()`
registers now; `granalign.GranAlignModel` and the package's other classes call it.
"""

from __future__ import annotations

import importlib.machinery
import sys
import threading
from typing import Any

__all__ = ["register_auto_classes"]

# Imported by AutoConfig, AutoModel*, AutoProcessor, AutoTokenizer and pipeline() before any lookup.
_TRIGGER = "transformers.models.auto.configuration_auto"
# Modules whose imports the hook follows: registering never starts while one of them is executing.
_WATCHED = ("transformers", "granalign")
_PER_MODULE_LOADERS = (importlib.machinery.SourceFileLoader, importlib.machinery.SourcelessFileLoader)

_lock = threading.RLock()
_state = threading.local()  # depth: watched modules executing in this thread; finding: in find_spec
_registered = False


def register_auto_classes() -> None:
    """Register the GranAlign classes with the Auto classes now (idempotent; imports torch)."""
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification, AutoProcessor

        from .configuration_granalign import GranAlignConfig  # also registers efficientnet_lite
        from .modeling_granalign import GranAlignModel
        from .processing_granalign import GranAlignProcessor

        AutoConfig.register(GranAlignConfig.model_type, GranAlignConfig, exist_ok=True)
        AutoModel.register(GranAlignConfig, GranAlignModel, exist_ok=True)
        AutoModelForZeroShotImageClassification.register(GranAlignConfig, GranAlignModel, exist_ok=True)
        AutoProcessor.register(GranAlignConfig, GranAlignProcessor, exist_ok=True)
        # Saved checkpoints carry their code and `auto_map`, so they load with `trust_remote_code=True`
        # where this package is not installed.
        GranAlignConfig.register_for_auto_class()
        GranAlignModel.register_for_auto_class("AutoModel")
        GranAlignProcessor.register_for_auto_class("AutoProcessor")
        _registered = True
    _remove_hook()


def _after_watched_import() -> None:
    """Register if the Auto classes are importable and nothing watched is mid-import in this thread."""
    if _registered or getattr(_state, "depth", 0) or _TRIGGER not in sys.modules:
        return
    _state.depth = 1  # the imports below must not re-enter
    try:
        register_auto_classes()
    except ImportError:
        pass  # a module it needs is still executing (outside transformers/granalign): the next import retries
    finally:
        _state.depth = 0


def _follow(loader: Any) -> None:
    """Wrap one module's loader so that its completion may trigger registering."""
    execute = loader.exec_module

    def exec_module(module: Any) -> None:
        _state.depth = getattr(_state, "depth", 0) + 1
        try:
            execute(module)
        finally:
            _state.depth -= 1
        _after_watched_import()

    loader.exec_module = exec_module


class _RegistrationHook:
    """A `sys.meta_path` finder that finds nothing itself: it follows the loading of watched modules."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if _registered or name.split(".", 1)[0] not in _WATCHED or getattr(_state, "finding", False):
            return None
        _state.finding = True
        try:
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            _state.finding = False
        if not isinstance(spec.loader, _PER_MODULE_LOADERS):
            return None  # shared or unusual loaders are left alone: the normal search finds them again
        _follow(spec.loader)
        return spec


_hook = _RegistrationHook()


def _remove_hook() -> None:
    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)


def install() -> None:
    """Register now if the Auto classes are already imported, else when they first are (see above)."""
    if _registered:
        return
    if _TRIGGER in sys.modules:
        try:
            register_auto_classes()
            return
        except ImportError:
            pass  # imported from inside a partly imported module: wait for the next import
    if _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)
