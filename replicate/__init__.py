"""replicate: data-parallel training of Keras models on TensorFlow, over GPUs and machines.

Names are imported on first use, so that `replicate.telemetry` works on a
machine without TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
# The distribution's name on the package index. The import name `replicate` is
# also used by an unrelated distribution, `replicate` (an API client).
__distribution__ = "keras-replicate"
_SUMMARY = "Data-parallel training of Keras models"


def _check_identity() -> None:
    """Fails the import when another distribution installed files into `replicate/`.

    Both this project and the API client distributed as `replicate` install a
    top-level package `replicate`; in one environment their files overwrite one
    another, and whichever was installed last owns `replicate/__init__.py`. If
    this file runs while that other distribution's metadata sits beside it,
    stop here with what to do, instead of failing later with missing names.
    (One directory listing: cheap enough for every import.)

    Raises:
        ImportError: If a distribution named `replicate` that is not this
            project (under its former name) is installed beside this package.
    """
    import os

    site = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        names = os.listdir(site)
    except OSError:
        return
    for name in names:
        if not (name.startswith("replicate-") and name.endswith(".dist-info")):
            continue
        try:
            with open(os.path.join(site, name, "METADATA"), encoding="utf-8") as f:
                summary = next((line for line in f if line.startswith("Summary:")), "")
        except OSError:
            continue
        if summary.partition(":")[2].strip().startswith(_SUMMARY):
            continue  # this project, installed under its former distribution name
        version = name[len("replicate-") : -len(".dist-info")]
        raise ImportError(
            f"`import replicate` found keras-replicate (data-parallel Keras training) in "
            f"{site}, but the distribution `replicate` {version}, an unrelated API client, "
            "is installed there too and uses the same import name `replicate`. The two "
            "cannot share one environment: their files overwrite each other. Install "
            "keras-replicate in a virtual environment of its own (python -m venv .venv && "
            ".venv/bin/pip install keras-replicate), or run `pip uninstall -y replicate "
            "keras-replicate` and then `pip install keras-replicate`."
        )


_check_identity()

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
