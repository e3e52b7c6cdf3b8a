"""Processes that share a host share its cores: each TensorFlow runtime gets its part.

TensorFlow sizes its thread pools (intra-op: inside one op; inter-op: ops
side by side, which is how one process's towers overlap) for every core of
the machine. N processes of one job on a host would then run N x cores
threads that fight for the cores. So each process of a multi-process job
takes `cores // processes on this host` threads for each pool, the way
torchrun sets `OMP_NUM_THREADS` for its workers; one process alone keeps
TensorFlow's defaults.

Choose otherwise with the backend's `threads=` option or the
`REPLICATE_THREADS` environment variable (a positive number, or `auto`, or
`tensorflow` to keep TensorFlow's own sizes); TensorFlow's own
`TF_NUM_INTRAOP_THREADS` and `TF_NUM_INTEROP_THREADS`, when set, win.
"""

from __future__ import annotations

import os
import warnings

ENVIRONMENT = "REPLICATE_THREADS"
_TENSORFLOW = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


def cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def share(local_size: int, setting: int | str | None = None) -> int | None:
    """Threads per pool for one of `local_size` processes on this host.

    Args:
        local_size: The job's processes on this host.
        setting: A positive number of threads, `"auto"` (the host's cores
            divided among its processes), `"tensorflow"` (TensorFlow's own
            sizes: `None`). Defaults to `REPLICATE_THREADS`, else `"auto"`.

    Returns:
        The number of threads, or `None` to leave TensorFlow's sizes.

    Raises:
        ValueError: For a setting that is none of those.
    """
    if setting is None:
        setting = os.environ.get(ENVIRONMENT, "auto")
    if isinstance(setting, str) and setting.strip().isdigit():
        setting = int(setting)
    if setting == "tensorflow" or any(name in os.environ for name in _TENSORFLOW):
        return None
    if setting == "auto":
        return None if local_size <= 1 else max(1, cores() // local_size)
    if isinstance(setting, int) and not isinstance(setting, bool) and setting > 0:
        return setting
    raise ValueError(
        "`threads` must be a positive number of threads, 'auto' (the host's cores divided "
        "among its processes) or 'tensorflow' (TensorFlow's own sizes). Received: "
        f"threads={setting!r} (option or {ENVIRONMENT})"
    )


def apply(local_size: int, setting: int | str | None = None) -> int | None:
    """Sizes this process's TensorFlow thread pools to its share of the host.

    Works only before TensorFlow starts its runtime (the first op or
    variable); later, it warns once and leaves the sizes, saying how to fix
    it. `replicate launch` also sets `TF_NUM_INTRAOP_THREADS`,
    `TF_NUM_INTEROP_THREADS` and `OMP_NUM_THREADS` for each process it
    starts, which TensorFlow reads when it starts.

    Returns:
        The threads per pool now in force, or `None` where TensorFlow keeps
        its own.
    """
    import tensorflow as tf  # here: the launcher uses this module without TensorFlow

    threads = share(local_size, setting)
    if threads is None:
        return None
    config = tf.config.threading
    if (
        config.get_intra_op_parallelism_threads() == threads
        and config.get_inter_op_parallelism_threads() == threads
    ):
        return threads
    try:
        config.set_intra_op_parallelism_threads(threads)
        config.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        warnings.warn(
            f"replicate: this process is one of {local_size} on its host, but TensorFlow "
            "had already started, so its thread pools keep one thread per core of the host "
            f"and the processes compete for them (replicate would use {threads}). Create the "
            "backend (`replicate.get_backend(...)`) before the first tensor or model, start "
            "the job with `replicate launch`, or set TF_NUM_INTRAOP_THREADS and "
            "TF_NUM_INTEROP_THREADS; REPLICATE_THREADS=tensorflow silences this.",
            stacklevel=3,
        )
        return None
    return threads


def launcher_environment(nproc: int, environ: dict[str, str]) -> dict[str, str]:
    """The variables `replicate launch` adds for each of `nproc` processes on a host:
    TensorFlow's pool sizes and `OMP_NUM_THREADS` (torchrun's convention), each only
    where the user has not set it."""
    threads = share(nproc, environ.get(ENVIRONMENT))
    if threads is None:
        return {}
    names = (*_TENSORFLOW, "OMP_NUM_THREADS")
    return {name: str(threads) for name in names if name not in environ}
