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
    "check": "replicate.checking",
    "get_backend": "replicate.backends",
    "is_chief": "replicate.cluster",
    "shard": "replicate.data",
    "list_devices": "replicate.devices",
    "process_devices": "replicate.devices",
    "replicate": "replicate.model",
    "simulate_devices": "replicate.devices",
}

__all__ = [
    "Backend",
    "ReplicaBuilder",
    "ReplicatedModel",
    "__version__",
    "check",
    "get_backend",
    "is_chief",
    "list_devices",
    "process_devices",
    "replicate",
    "shard",
    "simulate_devices",
]

if TYPE_CHECKING:
    from replicate.backends import Backend, get_backend
    from replicate.builder import ReplicaBuilder
    from replicate.checking import check
    from replicate.cluster import is_chief
    from replicate.data import shard
    from replicate.devices import list_devices, process_devices, simulate_devices
    from replicate.model import ReplicatedModel, replicate


_SUBMODULES = (
    "backends",
    "builder",
    "callbacks",
    "checking",
    "cluster",
    "data",
    "devices",
    "model",
    "processes",
    "reduce",
    "replica",
    "steps",
    "telemetry",
)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"replicate.{name}")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'replicate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
