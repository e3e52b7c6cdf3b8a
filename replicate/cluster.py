"""Who this process is in its job, read from the launcher's environment.

`horovodrun` sets `HOROVOD_RANK`, `HOROVOD_SIZE`, `HOROVOD_LOCAL_RANK` and
`HOROVOD_LOCAL_SIZE`; `replicate launch` (and torchrun-style launchers) set
`RANK`, `WORLD_SIZE`, `LOCAL_RANK` and `LOCAL_WORLD_SIZE` beside `TF_CONFIG`;
MPI launchers set their own; a cluster manager (Kubeflow's TFJob, Vertex AI,
SageMaker) may set only `TF_CONFIG`. Outside any launcher a process is rank 0
of 1.

`TF_CONFIG` as the cluster managers write it (checked against their sources;
the README's "Cluster managers" section cites them):

- Kubeflow's TFJob (training-operator v1): one job per replica type, lower
  case (`chief`, `master`, `worker`, `ps`, `evaluator`, the evaluator included
  in `cluster`), addresses `<job>-<type>-<i>.<namespace>.svc:2222`, plus
  `"environment": "cloud"`; with `enableDynamicWorker` the workers are a map
  from index to address.
- Vertex AI: `chief` (worker pool 0), `worker` (pool 1), `ps` (pool 2), never
  `evaluator` in `cluster` (pool 3's tasks have type `evaluator`), port 2222,
  plus `job`, `environment`, and `trial`/`cloud` in `task`.
- SageMaker's TensorFlow container: with `multi_worker_mirrored_strategy`,
  `worker` only (`algo-1:8890`, ...) plus `"environment": "cloud"`; with
  `parameter_server`, `master`, `worker` and `ps`.
"""

from __future__ import annotations

import os

_RANK = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "RANK")
_SIZE = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "WORLD_SIZE")
_LOCAL_RANK = ("HOROVOD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "LOCAL_RANK")
_LOCAL_SIZE = ("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "LOCAL_WORLD_SIZE")
# Set by `replicate launch` in every process it starts.
LAUNCHED = "REPLICATE_LAUNCH"


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


def launched() -> bool:
    """Whether `replicate launch` started this process (not a cluster manager's `TF_CONFIG`
    alone, nor `horovodrun`)."""
    return bool(os.environ.get(LAUNCHED))


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

# Training jobs in rank order; `chief` and `master` are two names for task 0.
_CHIEFS = ("chief", "master")
_TRAINING = (*_CHIEFS, "worker")

_EXAMPLE = (
    'TF_CONFIG=\'{"cluster": {"worker": ["host1:2222", "host2:2222"]}, '
    '"task": {"type": "worker", "index": 0}}\''
)

_NO_PS = (
    "replicate trains data-parallel with chief and worker tasks only, without parameter "
    "servers. Leave them out of the job: Kubeflow TFJob, remove the `PS` replica spec; "
    "Vertex AI, the third worker pool (workerPoolSpecs[2]); SageMaker, use "
    "distribution={'multi_worker_mirrored_strategy': {'enabled': True}} instead of "
    "'parameter_server'"
)

_NO_EVALUATOR = (
    "TF_CONFIG makes this process the job's evaluator (task type 'evaluator': a Kubeflow "
    "TFJob `Evaluator` replica, or Vertex AI's fourth worker pool, workerPoolSpecs[3]). "
    "replicate's collective backend trains with chief and worker tasks only, and "
    "evaluates inside `fit` over every process (`validation_data`). Remove the "
    "evaluator from the job spec, or evaluate in a job of its own that loads the chief's "
    "checkpoints (`keras.models.load_model(path).evaluate(...)`) with no TF_CONFIG"
)


class Cluster:
    """The training processes of a job as `TF_CONFIG` describes them, in rank order.

    The chief (job `chief`, or `master` as Kubeflow's TFJob and SageMaker may
    name it) is rank 0, then the workers in order. An `evaluator` job in
    `cluster` (Kubeflow's TFJob lists it there) takes no part in training.

    Attributes:
        jobs: The training jobs, `{job: [host:port, ...]}`, as handed to
            TensorFlow's runtime.
        addresses: `host:port` of every process, by rank.
        rank: This process's rank.
        task: `(job, index)` of this process, e.g. `("worker", 1)`.
        devices: The TensorFlow task names (`/job:worker/replica:0/task:1`), by rank.
    """

    def __init__(self, jobs: dict[str, list[str]], task_type: str, task_index: int) -> None:
        self.jobs = {job: list(jobs[job]) for job in _TRAINING if job in jobs}
        self.task = (task_type, task_index)
        self.addresses: list[str] = []
        self.devices: list[str] = []
        for job, addresses in self.jobs.items():
            for index, address in enumerate(addresses):
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

    Accepts the layouts of a data-parallel job that Kubeflow's TFJob, Vertex
    AI and SageMaker write (see this module's docstring): `worker` tasks, with
    or without a `chief` or `master`; extra keys (`environment`, `job`,
    `task.trial`, `task.cloud`) and an `evaluator` entry in `cluster` are
    ignored.

    Raises:
        ValueError: If `TF_CONFIG` is missing, not JSON, not a cluster of
            chief/master and worker tasks with this process among them, if it
            has parameter servers (`ps`), a sparse worker map (TFJob's
            `enableDynamicWorker`), or makes this process an `evaluator`; the
            message shows what was read and what to change.
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
    known = (*_TRAINING, "evaluator", "ps")
    unknown = sorted(set(cluster) - set(known))
    if unknown:
        raise bad(f"names jobs {unknown}; the jobs TensorFlow knows are {list(known)}")
    if "ps" in cluster:
        raise bad(f"has parameter servers (job 'ps'). {_NO_PS}")
    if isinstance(task, dict) and task.get("type") == "evaluator":
        raise bad(_NO_EVALUATOR)
    for job, addresses in cluster.items():
        if isinstance(addresses, dict):
            raise bad(
                f"lists {job!r} as a map from task index to address: a sparse cluster, what "
                "a Kubeflow TFJob with `enableDynamicWorker: true` writes for parameter-server "
                "training. Every process must know every other: set `enableDynamicWorker: "
                "false` (the default)"
            )
        if (
            not isinstance(addresses, list)
            or not addresses
            or not all(isinstance(a, str) and ":" in a for a in addresses)
        ):
            raise bad(f"must list {job!r} as a non-empty list of 'host:port' strings")
    chiefs = [job for job in _CHIEFS if job in cluster]
    if len(chiefs) > 1 or any(len(cluster[job]) > 1 for job in chiefs):
        raise bad("names more than one chief ('chief' and 'master' are both task 0)")
    if not any(job in cluster for job in _TRAINING):
        raise bad("has no 'chief', 'master' or 'worker' tasks to train")
    if not isinstance(task, dict) or task.get("type") not in _TRAINING:
        raise bad(f"has no 'task' whose 'type' is one of {[j for j in _TRAINING if j in cluster]}")
    if task["type"] not in cluster:
        raise bad(f"has task type {task['type']!r}, which 'cluster' does not list")
    index = task.get("index")
    if isinstance(index, bool) or not isinstance(index, int):
        index = None
    if index is None or not 0 <= index < len(cluster[task["type"]]):
        raise bad(
            f"has task index {task.get('index')!r}, outside the "
            f"{len(cluster[task['type']])} {task['type']!r} task(s)"
        )
    return Cluster(cluster, task["type"], index)
