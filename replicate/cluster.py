"""Who this process is in its job, read from the launcher's environment.

`horovodrun` sets `HOROVOD_RANK`, `HOROVOD_SIZE`, `HOROVOD_LOCAL_RANK` and
`HOROVOD_LOCAL_SIZE`; `replicate launch` (and torchrun-style launchers) set
`RANK`, `WORLD_SIZE`, `LOCAL_RANK` and `LOCAL_WORLD_SIZE` beside `TF_CONFIG`;
MPI launchers set their own; a cluster manager (Kubeflow's TFJob, Vertex AI,
SageMaker) may set only `TF_CONFIG`. Outside any launcher a process is rank 0
of 1.
"""

from __future__ import annotations

import os

_RANK = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "RANK")
_SIZE = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "WORLD_SIZE")
_LOCAL_RANK = ("HOROVOD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "LOCAL_RANK")
_LOCAL_SIZE = ("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "LOCAL_WORLD_SIZE")


def _read(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                raise ValueError(
                    f"The launcher's environment variable {name} must be an integer. "
                    f"Received: {name}={value!r}"
                ) from None
    return default


def process_rank() -> int:
    """This process's rank in its job (0 outside a launcher)."""
    if "TF_CONFIG" in os.environ and not any(n in os.environ for n in _RANK):
        return tf_config().rank
    return _read(_RANK, 0)


def process_count() -> int:
    """The number of processes in the job (1 outside a launcher)."""
    if "TF_CONFIG" in os.environ and not any(n in os.environ for n in _SIZE):
        return tf_config().size
    return _read(_SIZE, 1)


def local_rank() -> int:
    """This process's index among the job's processes on its machine (0 outside a launcher)."""
    return _read(_LOCAL_RANK, 0)


def local_size() -> int:
    """The number of the job's processes on this machine (1 outside a launcher)."""
    return _read(_LOCAL_SIZE, 1)


def is_chief() -> bool:
    """Whether this process is rank 0: the one that prints, saves and logs.

    Reads the launcher's environment, so it works before any model exists.
    """
    return process_rank() == 0


# -- TF_CONFIG: the cluster description of TensorFlow's collective runtime ------

_JOBS = ("chief", "worker")

_EXAMPLE = (
    'TF_CONFIG=\'{"cluster": {"worker": ["host1:2222", "host2:2222"]}, '
    '"task": {"type": "worker", "index": 0}}\''
)


class Cluster:
    """The processes of a job as `TF_CONFIG` describes them, in rank order.

    The chief (if the cluster names one) is rank 0, then the workers in order.

    Attributes:
        addresses: `host:port` of every process, by rank.
        rank: This process's rank.
        task: `(job, index)` of this process, e.g. `("worker", 1)`.
        devices: The TensorFlow task names (`/job:worker/replica:0/task:1`), by rank.
    """

    def __init__(self, jobs: dict[str, list[str]], task_type: str, task_index: int) -> None:
        self.jobs = jobs
        self.task = (task_type, task_index)
        self.addresses: list[str] = []
        self.devices: list[str] = []
        for job in _JOBS:
            for index, address in enumerate(jobs.get(job, [])):
                self.addresses.append(address)
                self.devices.append(f"/job:{job}/replica:0/task:{index}")
        self.rank = self.devices.index(f"/job:{task_type}/replica:0/task:{task_index}")

    @property
    def size(self) -> int:
        return len(self.addresses)

    @property
    def leader(self) -> str:
        """The task that resolves collective groups: rank 0."""
        return self.devices[0]


def tf_config(environ: dict[str, str] | None = None) -> Cluster:
    """Reads and checks the `TF_CONFIG` environment variable.

    Raises:
        ValueError: If `TF_CONFIG` is missing, not JSON, or not a cluster of
            `chief`/`worker` tasks with this process's task among them; the
            message shows what was read.
    """
    import json

    environ = os.environ if environ is None else environ
    raw = environ.get("TF_CONFIG")
    if not raw:
        raise ValueError(
            "backend='collective' reads the cluster from the TF_CONFIG environment "
            "variable, which is not set. Start the processes with `replicate launch "
            f"--nproc N -- python train.py`, or set it on each host, e.g. {_EXAMPLE}."
        )

    def bad(why: str) -> ValueError:
        return ValueError(f"TF_CONFIG {why}. Read: TF_CONFIG={raw!r}. Expected e.g. {_EXAMPLE}.")

    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise bad(f"is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise bad("must be a JSON object with 'cluster' and 'task'")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise bad("has no 'cluster' object")
    unknown = sorted(set(cluster) - set(_JOBS))
    if unknown:
        raise bad(
            f"names jobs {unknown}; replicate's collective backend runs 'chief' and "
            "'worker' tasks only (no parameter servers or evaluators)"
        )
    for job, addresses in cluster.items():
        if (
            not isinstance(addresses, list)
            or not addresses
            or not all(isinstance(a, str) and ":" in a for a in addresses)
        ):
            raise bad(f"must list {job!r} as a non-empty list of 'host:port' strings")
    if len(cluster.get("chief", [])) > 1:
        raise bad("names more than one chief")
    if not isinstance(task, dict) or task.get("type") not in cluster:
        raise bad(f"has no 'task' whose 'type' is one of {sorted(cluster)}")
    index = task.get("index")
    if not isinstance(index, int) or not 0 <= index < len(cluster[task["type"]]):
        raise bad(
            f"has task index {index!r}, outside the {len(cluster[task['type']])} "
            f"{task['type']!r} task(s)"
        )
    return Cluster(cluster, task["type"], index)
