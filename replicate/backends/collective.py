"""The collective backend: TensorFlow's own collective runtime, processes from `TF_CONFIG`.

Each process reads the cluster from `TF_CONFIG` (what `replicate launch`,
Kubeflow's TFJob, Vertex AI and SageMaker set), starts TensorFlow's gRPC
server for its task, and all-reduces with `collective_ops.all_reduce_v2`
inside the ordinary training `tf.function`: the engine under
`MultiWorkerMirroredStrategy`, without the strategy. Nothing to build.

TensorFlow accepts the collective configuration only before it starts (before
the first tensor or variable), so create this backend first:
`replicate.get_backend("collective")` at the top of the program, then build
the model and pass the backend to `replicate.replicate`.

A thread checks the other processes' health every few seconds; when one is
gone, every pending and later collective fails at once with a message naming
it, instead of waiting.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

import tensorflow as tf

from replicate import _keras_compat
from replicate import cluster as cluster_lib
from replicate import threads as threads_lib
from replicate.backends.base import Backend

COMMUNICATIONS = ("auto", "ring", "nccl")

# Eager collectives (broadcasts, step agreement, metric state) and traced ones
# (inside tf.function) take instance keys from separate ranges, so that the
# order in which a process traces and the order in which it calls eagerly
# cannot shift one another's keys. Agreement tokens have a range of their own:
# a token always meets the other processes' tokens, even after they made
# different calls, which is what a token is there to find.
_TRACED_KEYS = 1
_AGREEMENT_KEYS = 1 << 29
_EAGER_KEYS = 1 << 30

# TensorFlow's collective runtime is configured once per process; this records
# that process-wide fact, with what every backend object of the process shares:
# the instance keys (two objects must never reuse one) and the health check.
_STARTED: dict[str, Any] = {}


def _start(cluster: cluster_lib.Cluster) -> None:
    """Configures the collective runtime for this task (once per process)."""
    if _STARTED:
        if _STARTED["addresses"] != cluster.addresses or _STARTED["rank"] != cluster.rank:
            raise RuntimeError(
                "TensorFlow's collective runtime is already set up for another cluster "
                f"({_STARTED['addresses']}, rank {_STARTED['rank']}); a process belongs "
                "to one cluster."
            )
        return
    try:
        _keras_compat.configure_collectives(leader=cluster.leader, task=cluster.task)
    except RuntimeError as error:
        raise RuntimeError(
            "backend='collective' must be set up before TensorFlow starts (before the "
            "first tensor, variable or model): TensorFlow accepts its collective "
            'configuration only then. Call `backend = replicate.get_backend("collective")` '
            "at the top of the program (after `replicate.simulate_devices(n)`, if you "
            "use it), then pass `backend=backend` to `replicate.replicate`."
        ) from error
    _keras_compat.enable_collectives(cluster.jobs, cluster.task)
    _STARTED.update(
        addresses=list(cluster.addresses),
        rank=cluster.rank,
        keys={True: _EAGER_KEYS, False: _TRACED_KEYS, "agreement": _AGREEMENT_KEYS},
        lock=threading.Lock(),
        health=None,
    )


class CollectiveBackend(Backend):
    """One process of a cluster described by `TF_CONFIG`, on TensorFlow's collectives.

    Args:
        communication: `"auto"` (TensorFlow chooses), `"ring"` (gRPC ring
            all-reduce, any device) or `"nccl"` (GPU tensors through NCCL;
            with `variable_device="/gpu:0"` the reduction stays on the GPU).
        compression: `"fp16"` sends float32 gradients as float16 (half the
            traffic); `"none"` or `None` sends them as they are.
        startup_timeout: Seconds to wait, at the first collective, for every
            process of the cluster to start. Defaults to
            `REPLICATE_STARTUP_TIMEOUT` or 600. Later collectives have no
            timeout of their own (TensorFlow starts a timer thread for each
            timed collective, which lives as long as its timeout: one per step
            would pile up); a lost process is found by the health check and a
            stuck one by the watchdog.
        health_interval: Seconds between health checks of the other processes.
            Defaults to 5.
        hang_timeout: See `replicate.Backend`: seconds a process may spend
            outside the collective steps before it is stopped. Defaults to
            `REPLICATE_HANG_TIMEOUT` or 1800.
        lockstep: See `replicate.Backend`. Defaults to True.
        threads: TensorFlow threads per pool for this process: a number,
            `"auto"` (the host's cores divided among its processes) or
            `"tensorflow"` (TensorFlow's own sizes). Defaults to
            `REPLICATE_THREADS`, else `"auto"` (`replicate.threads`).

    Raises:
        ValueError: For an unknown `communication` or compression, or a
            missing or malformed `TF_CONFIG` (the message shows what was read).
        RuntimeError: If TensorFlow has already started in this process.
    """

    name = "collective"
    collectives_span_job = True

    @property
    def launcher(self) -> str:
        """What started the job: `replicate launch`, or whatever set `TF_CONFIG`."""
        return "replicate launch" if cluster_lib.launched() else "TF_CONFIG"

    def __init__(
        self,
        communication: str = "auto",
        compression: str | None = None,
        *,
        startup_timeout: float | None = None,
        health_interval: float = 5.0,
        hang_timeout: float | None = None,
        lockstep: bool = True,
        threads: int | str | None = None,
    ) -> None:
        super().__init__(compression=compression, hang_timeout=hang_timeout, lockstep=lockstep)
        if communication not in COMMUNICATIONS:
            raise ValueError(
                f"Unknown communication. Received: communication={communication!r}. "
                f"Choose one of {list(COMMUNICATIONS)}."
            )
        if startup_timeout is None:
            startup_timeout = float(os.environ.get("REPLICATE_STARTUP_TIMEOUT", 600))
        if not startup_timeout > 0:
            raise ValueError(
                "`startup_timeout` must be positive seconds. Received: "
                f"startup_timeout={startup_timeout!r}"
            )
        self.communication = communication
        self.startup_timeout = float(startup_timeout)
        self.health_interval = float(health_interval)
        self.cluster = cluster_lib.tf_config()
        # Before TensorFlow starts: it reads its pool sizes once.
        self.threads = threads_lib.apply(self.local_size, threads)
        _start(self.cluster)

    @property
    def rank(self) -> int:
        return self.cluster.rank

    @property
    def size(self) -> int:
        return self.cluster.size

    @property
    def local_rank(self) -> int:
        return cluster_lib.local_rank()

    @property
    def local_size(self) -> int:
        return cluster_lib.local_size()

    # -- the engine's calls ------------------------------------------------------

    def _key(self, kind: Any = None) -> int:
        kind = tf.executing_eagerly() if kind is None else kind
        with _STARTED["lock"]:
            _STARTED["keys"][kind] += 1
            return _STARTED["keys"][kind]

    def _reduce(
        self, tensor: tf.Tensor, merge_op: str, *, timeout: float = 0, keys: Any = None
    ) -> tf.Tensor:
        if tf.executing_eagerly() and not timeout:
            self._ensure_health_check()
        device = tensor.device or "/cpu:0"
        on_gpu = "GPU" in device.upper()
        # NCCL reduces GPU tensors only; CPU tensors (metric state, counts) take the ring.
        hint = "ring" if self.communication == "nccl" and not on_gpu else self.communication
        with tf.device(device):
            return _keras_compat.all_reduce(
                tensor,
                group_size=self.size,
                group_key=2 if on_gpu else 1,  # a group holds one device type
                instance_key=self._key(keys),
                merge_op=merge_op,
                communication_hint=hint,
                timeout=timeout,
            )

    def _all_sum(self, tensors: list[tf.Tensor]) -> list[tf.Tensor]:
        # One collective: the tensors (of one dtype) travel packed in one buffer.
        with tf.device(tensors[0].device or None):
            flat = tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)
        summed = self._reduce(flat, "Add")
        pieces = tf.split(summed, [tf.size(t) for t in tensors])
        return [tf.reshape(p, tf.shape(t)) for p, t in zip(pieces, tensors)]

    def _all_max(self, value: tf.Tensor) -> tf.Tensor:
        return self._reduce(tf.reshape(value, (1,)), "Max")[0]

    def _agreement_sum(self, table: tf.Tensor) -> tf.Tensor:
        return self._reduce(table, "Add", keys="agreement")

    def _is_lost_peer(self, error: BaseException) -> bool:
        return isinstance(
            error,
            (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError),
        ) or "Collective ops is aborted" in str(error)

    def _lost_peer_hint(self) -> str:
        first = (
            "replicate launch names the process that exited first"
            if self.launcher == "replicate launch"
            else "the log of the process that exited first (your cluster manager's) says why"
        )
        return (
            f"{first}; one that stopped answering is found by the health check, one stuck "
            "in its own code by its watchdog."
        )

    def _lost_peer_detail(self, error: BaseException) -> str:
        found = re.search(r"process \d+ of \d+ \([^)]*\) is down", str(error))
        if found:
            return found.group(0)
        if isinstance(error, tf.errors.DeadlineExceededError):
            return (
                f"not every process of the cluster started within {self.startup_timeout:g} s "
                "(startup_timeout=, REPLICATE_STARTUP_TIMEOUT)"
            )
        return super()._lost_peer_detail(error)

    # -- health of the other processes -------------------------------------------

    def _ensure_health_check(self) -> None:
        if _STARTED["health"] is not None or self.size == 1:
            return
        # Wait until every process is up before watching them.
        _STARTED["health"] = "starting"
        self._reduce(tf.zeros((1,)), "Add", timeout=self.startup_timeout).numpy()
        thread = threading.Thread(target=self._watch, daemon=True, name="replicate-health")
        _STARTED["health"] = thread
        thread.start()

    def _watch(self) -> None:
        import time

        peers = [(r, d) for r, d in enumerate(self.cluster.devices) if r != self.rank]
        while True:
            time.sleep(self.health_interval)
            for rank, device in peers:
                for attempt in range(3):
                    try:
                        _keras_compat.check_peer_health(device, timeout_in_ms=10_000)
                        break
                    except (
                        tf.errors.UnavailableError,
                        tf.errors.FailedPreconditionError,
                        tf.errors.DeadlineExceededError,
                    ):
                        if attempt == 2:
                            _keras_compat.abort_collectives(
                                tf.errors.UNAVAILABLE,
                                f"replicate: process {rank} of {self.size} "
                                f"({self.cluster.addresses[rank]}) is down",
                            )
                            return
                    except Exception:  # the runtime is shutting down
                        return
