"""Files written by a training job: whole or not at all, by the chief alone.

A crash while writing a checkpoint must leave the previous one in force, and
a reader must never see half a file. Every file replicate writes goes to a
temporary name beside its target and is renamed into place. Across
processes only the chief writes, and the others wait for it (`on_chief`).
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


def on_chief(model: Any, phase: str, write: Callable[[], int | None]) -> int | None:
    """Runs `write` on the chief process only; the others wait until it is done.

    Outside `fit` this is a collective: every process calls it, the processes
    first agree that they are all at `phase` (`replicate.backends.agreement`),
    the chief writes while the others wait (its watchdog does not count the
    write, theirs not the wait), and then every process learns the outcome.
    Inside `fit` (a callback, `ModelCheckpoint`) the chief writes alone, and
    the other processes return at once.

    Args:
        model: A `ReplicatedModel` (its backend and progress).
        phase: `"save"`, `"save_weights"` or `"export"`.
        write: Writes on the chief; may return a small integer (an export's
            version) that every process receives.

    Returns:
        What the chief's `write` returned, on every process (`None` on the
        others inside `fit`).

    Raises:
        RuntimeError: On the other processes, if the chief's write failed;
            the chief raises its own error.
    """
    from replicate.backends.agreement import Position
    from replicate.processes import failures

    backend = model.backend
    if backend.size == 1:
        return write()
    if model.progress.fitting:
        if not backend.is_chief:
            return None
        with backend.watchdog.writing():
            return write()
    where = Position(phase, model.progress.trained)
    with failures(backend, during="export" if phase == "export" else "save"):
        backend.agreement.meet(where)
        result, error = None, None
        if backend.is_chief:
            try:
                with backend.watchdog.writing():
                    result = write()
            except Exception as raised:
                error = raised
        else:
            backend.watchdog.expect_writer()
        done = backend.agreement.meet(
            Position("written", where.epoch), failed=error is not None, value=result or 0
        )
    if error is not None:
        raise error
    if done.failed:
        raise RuntimeError(
            f"replicate: the chief (process 0 of {backend.size}) failed in `{phase}`, so "
            "nothing was written; its own output shows the error."
        )
    return done.values[0] or None
