"""The Horovod backend: processes launched by `horovodrun`, gradients allreduced.

The only module of replicate that imports horovod. It uses Horovod's
collectives on tensors; Horovod's own Keras wrappers do not work with Keras 3.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from replicate import threads as threads_lib
from replicate.backends.base import Backend


def _import_horovod():
    try:
        import horovod.tensorflow as hvd
    except ImportError as error:
        raise ImportError(
            "backend='horovod' needs Horovod built with TensorFlow support "
            "(`make horovod` builds it into this project's environment; see the "
            f"README). Importing it failed: {error}"
        ) from error
    return hvd


def build_info() -> dict[str, Any]:
    """How the installed Horovod was built (for `replicate devices`), or why it is absent."""
    try:
        hvd = _import_horovod()
    except ImportError as error:
        return {"installed": False, "reason": str(error).split(". Importing")[0]}
    import horovod

    return {
        "installed": True,
        "version": horovod.__version__,
        "gloo": bool(hvd.gloo_built()),
        "mpi": bool(hvd.mpi_built()),
        "nccl": bool(hvd.nccl_built()),
        "cuda": bool(hvd.cuda_built()),
    }


class HorovodBackend(Backend):
    """One process of a `horovodrun` job; its towers combine first, then processes.

    Args:
        compression: `"fp16"` sends gradients as float16 (half the traffic)
            and casts them back; `"none"` or `None` sends them as they are.
        hang_timeout: See `replicate.Backend`: seconds a process may spend
            outside the collective steps before it is stopped. Defaults to
            `REPLICATE_HANG_TIMEOUT` or 1800.
        lockstep: See `replicate.Backend`. Defaults to True.
        threads: TensorFlow threads per pool for this process: a number,
            `"auto"` (the host's cores divided among its processes) or
            `"tensorflow"` (TensorFlow's own sizes). Defaults to
            `REPLICATE_THREADS`, else `"auto"` (`replicate.threads`).

    Raises:
        ValueError: For an unknown compression or `threads`.
        ImportError: Where Horovod is not installed.
    """

    name = "horovod"
    launcher = "horovodrun"

    def __init__(
        self,
        compression: str | None = None,
        *,
        hang_timeout: float | None = None,
        lockstep: bool = True,
        threads: int | str | None = None,
    ) -> None:
        super().__init__(compression=compression, hang_timeout=hang_timeout, lockstep=lockstep)
        self._hvd = _import_horovod()
        self._hvd.init()
        self.threads = threads_lib.apply(self.local_size, threads)

    @property
    def rank(self) -> int:
        return self._hvd.rank()

    @property
    def size(self) -> int:
        return self._hvd.size()

    @property
    def local_rank(self) -> int:
        return self._hvd.local_rank()

    @property
    def local_size(self) -> int:
        return self._hvd.local_size()

    def _all_sum(self, tensors: list[tf.Tensor]) -> list[tf.Tensor]:
        return list(self._hvd.grouped_allreduce(tensors, op=self._hvd.Sum))

    def tower_sum(self, value: tf.Tensor, name: str) -> tf.Tensor:
        # Horovod matches an op by its node's full name. Made at the root of the traced
        # function's name scopes, the op is named by `name` alone, not by the layers and
        # model around it (processes whose automatic layer names differ still match); the
        # inlining of each tower's call then prefixes that call's name, alike in every
        # process, so tower k of each process meets tower k of the others.
        with tf.compat.v1.get_default_graph().name_scope(None):
            return self._hvd.allreduce(value, name=name, op=self._hvd.Sum)

    def _all_max(self, value: tf.Tensor) -> tf.Tensor:
        return self._hvd.allreduce(tf.reshape(value, (1,)), op=self._hvd.Max)[0]

    def _broadcast(self, variables: list[tf.Variable], root_rank: int) -> None:
        # Eagerly, one buffer per dtype, in the variables' order. Horovod's own
        # `broadcast_variables` traces a function whose tensors are named after
        # the variables, and Horovod matches tensors by name: processes whose
        # variable names differ (a model loaded on the chief, built afresh on
        # the others) would wait for each other for ever.
        groups: dict[tf.DType, list[int]] = {}
        for i, variable in enumerate(variables):
            groups.setdefault(variable.dtype, []).append(i)
        for indices in groups.values():
            flat = tf.concat([tf.reshape(variables[i], [-1]) for i in indices], axis=0)
            received = self._hvd.broadcast(flat, root_rank)
            sizes = [int(np.prod(variables[i].shape)) for i in indices]
            for i, piece in zip(indices, tf.split(received, sizes)):
                variables[i].assign(tf.reshape(piece, variables[i].shape))

    def _is_lost_peer(self, error: BaseException) -> bool:
        return "Horovod has been shut down" in str(error) or (
            type(error).__name__ == "HorovodInternalError"
        )

    def _lost_peer_hint(self) -> str:
        return (
            "horovodrun's log names the process that failed first ('Process name: N') "
            "when it died; one that froze made Gloo time out (30 s by default, "
            "HOROVOD_GLOO_TIMEOUT_SECONDS)."
        )
