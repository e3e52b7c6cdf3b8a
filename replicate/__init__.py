"""replicate: data-parallel training of Keras models on TensorFlow, over GPUs and machines.

Names are imported on first use, so that `replicate.telemetry` works on a
machine without TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Backend": "replicate.backends",
    "ReplicaBuilder": "replicate.builder",
    "ReplicatedModel": "replicate.model",
    "get_backend": "replicate.backends",
    "list_devices": "replicate.devices",
    "replicate": "replicate.model",
    "simulate_devices": "replicate.devices",
}

__all__ = [*sorted(_LAZY), "__version__"]

if TYPE_CHECKING:
    from replicate.backends import Backend, get_backend
    from replicate.builder import ReplicaBuilder
    from replicate.devices import list_devices, simulate_devices
    from replicate.model import ReplicatedModel, replicate


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'replicate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
