"""Backend: how the processes of one training job talk to each other."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import tensorflow as tf


class Backend(abc.ABC):
    """Collectives across processes; one process is the identity.

    A backend sees gradients only after the towers of its own process have
    been averaged, so it never knows about towers.
    """

    name: str = "base"

    @property
    @abc.abstractmethod
    def rank(self) -> int:
        """This process's index, 0 to `size - 1`."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """The number of processes."""

    @property
    def is_chief(self) -> bool:
        """Whether this process writes checkpoints, logs and progress bars."""
        return self.rank == 0

    def reduce_gradients(self, grads: Sequence[Any], count: tf.Tensor) -> list[Any]:
        """Averages gradients over processes, weighted by each one's `count` of samples."""
        return list(grads)

    def reduce_state(self, values: Sequence[tf.Tensor], aggregations: Sequence[str]) -> list[Any]:
        """Combines metric state over processes: summed where `aggregation` is "sum",
        else averaged, so that a metric's result covers every process's samples."""
        return list(values)

    def reduce_max(self, value: tf.Tensor) -> tf.Tensor:
        """The maximum of an integer scalar over processes."""
        return value

    def broadcast_variables(self, variables: Sequence[Any], root_rank: int = 0) -> None:
        """Overwrites `variables` on every process with their values on `root_rank`."""

    def describe_failure(self, error: BaseException) -> str | None:
        """A message if `error` means another process was lost, else `None`."""
        return None

    def barrier(self) -> None:
        """Waits until every process has reached this point."""
