"""The Horovod backend: processes launched by `horovodrun`, gradients allreduced.

The only module of replicate that imports horovod. It uses Horovod's
collectives on tensors; Horovod's own Keras wrappers do not work with Keras 3.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from replicate.backends.base import Backend

COMPRESSIONS = ("none", "fp16")


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


class HorovodBackend(Backend):
    """One process of a `horovodrun` job; its towers average first, then processes.

    Args:
        compression: `"fp16"` sends gradients as float16 (half the traffic)
            and casts them back; `"none"` or `None` sends them as they are.

    Raises:
        ValueError: For an unknown compression.
        ImportError: Where Horovod is not installed.
    """

    name = "horovod"

    def __init__(self, compression: str | None = None) -> None:
        choice = "none" if compression is None else compression
        if choice not in COMPRESSIONS:
            raise ValueError(
                f"Unknown Horovod compression. Received: compression={compression!r}. "
                f"Choose one of {list(COMPRESSIONS)}."
            )
        self._hvd = _import_horovod()
        self._hvd.init()
        self.compression_name = choice
        self._compression = (
            self._hvd.Compression.fp16 if choice == "fp16" else self._hvd.Compression.none
        )

    @property
    def rank(self) -> int:
        return self._hvd.rank()

    @property
    def size(self) -> int:
        return self._hvd.size()

    @property
    def local_rank(self) -> int:
        """This process's index among the processes of its machine."""
        return self._hvd.local_rank()

    def reduce_gradients(self, grads: Sequence[Any], count: tf.Tensor) -> list[Any]:
        """Sum over processes of `count * grad`, divided by the total count.

        Each process's gradient is the mean over its own samples, so weighting
        by the number of samples gives the mean over every sample of the step,
        also when processes hold different numbers (the last batch of uneven
        shards, or none at all).
        """
        if self.size == 1:
            return list(grads)
        present = [i for i, g in enumerate(grads) if g is not None]
        dense = [tf.convert_to_tensor(grads[i]) for i in present]
        weight = tf.cast(count, tf.float32)
        scaled = [g * tf.cast(weight, g.dtype) for g in dense]
        summed = self._hvd.grouped_allreduce(
            scaled, op=self._hvd.Sum, compression=self._compression
        )
        total = self._hvd.allreduce(tf.reshape(weight, (1,)), op=self._hvd.Sum)[0]
        out: list[Any] = [None] * len(grads)
        for i, g in zip(present, summed):
            out[i] = tf.math.divide_no_nan(g, tf.cast(total, g.dtype))
        return out

    def reduce_state(self, values: Sequence[Any], aggregations: Sequence[str]) -> list[Any]:
        if self.size == 1 or not values:
            return list(values)
        out: list[Any] = list(values)
        for op, wanted in ((self._hvd.Sum, True), (self._hvd.Average, False)):
            chosen = [i for i, a in enumerate(aggregations) if (a == "sum") == wanted]
            if not chosen:
                continue
            tensors = [tf.convert_to_tensor(values[i]) for i in chosen]
            reduced = self._hvd.grouped_allreduce(tensors, op=op)
            for i, r in zip(chosen, reduced, strict=True):
                out[i] = r
        return out

    def reduce_max(self, value: Any) -> Any:
        if self.size == 1:
            return value
        return self._hvd.allreduce(tf.reshape(tf.cast(value, tf.int64), (1,)), op=self._hvd.Max)[0]

    def broadcast_variables(self, variables: Sequence[Any], root_rank: int = 0) -> None:
        if self.size == 1 or not variables:
            return
        tf_variables = [getattr(v, "value", v) for v in variables]
        self._hvd.broadcast_variables(tf_variables, root_rank=root_rank)

    def describe_failure(self, error: BaseException) -> str | None:
        text = str(error)
        if "Horovod has been shut down" not in text and type(error).__name__ != (
            "HorovodInternalError"
        ):
            return None
        return (
            f"replicate: process {self.rank} of {self.size} lost the other processes of "
            "this horovodrun job: a peer died or stopped answering, and Horovod shut "
            "down. horovodrun's log names the process that failed first ('Process name: "
            "N') when it died; one that froze made Gloo time out (30 s by default, "
            "HOROVOD_GLOO_TIMEOUT_SECONDS)."
        )

    def barrier(self) -> None:
        if self.size > 1:
            self._hvd.allreduce(tf.zeros((1,)), op=self._hvd.Sum)
