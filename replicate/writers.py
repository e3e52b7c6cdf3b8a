"""Files written by a training job: whole or not at all.

A crash while writing a checkpoint must leave the previous one in force, and
a reader must never see half a file. Every file replicate writes goes to a
temporary name beside its target and is renamed into place.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def atomically(write: Callable[..., None], filepath: Any, *args: Any, **kwargs: Any) -> None:
    """Writes through `write` to a temporary name beside `filepath`, then renames it.

    Args:
        write: A Keras writer (`model.save`, `model.save_weights`) that names
            its format by the file's suffix.
        filepath: The target. A remote path (`gs://...`) or one without a
            Keras suffix is written directly.
        *args, **kwargs: Passed to `write`.
    """
    path = str(filepath)
    suffix = next((s for s in (".weights.h5", ".keras", ".h5") if path.endswith(s)), None)
    if suffix is None or "://" in path:  # not a local file Keras names by suffix
        write(filepath, *args, **kwargs)
        return
    if kwargs.get("overwrite", True) is False and os.path.exists(path):
        write(filepath, *args, **kwargs)  # Keras asks before overwriting
        return
    folder, name = os.path.split(path)
    staging = os.path.join(folder, f".{name[: -len(suffix)]}.partial-{os.getpid()}{suffix}")
    try:
        write(staging, *args, **kwargs)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
