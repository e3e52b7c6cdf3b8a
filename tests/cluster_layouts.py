"""`TF_CONFIG` exactly as the cluster managers write it, for tests/test_cluster*.py.

Sources (read with the project's search tools, November 2026):

- Kubeflow's TFJob: kubeflow/training-operator, branch release-1.9,
  `pkg/controller.v1/tensorflow/tensorflow.go` (`genTFConfigJSONStr`,
  `genClusterSpec`): one job per replica type in lower case, the evaluator
  included in `cluster` since #1146 (2020); addresses
  `<tfjob>-<type>-<index>.<namespace>.svc:<port>`, the port of the container
  port named `tfjob-port`, default 2222 (`pkg/apis/kubeflow.org/v1/
  tensorflow_types.go`); `"environment": "cloud"`; no TF_CONFIG at all for a
  job of one replica (`isDistributed`). Go's encoder writes the fields in the
  order cluster, task, environment, and map keys sorted.
- Vertex AI: https://cloud.google.com/vertex-ai/docs/training/distributed-training
  ("The format of TF_CONFIG"): `chief` (workerPoolSpecs[0]), `worker` ([1]),
  `ps` ([2]); `cluster` never holds `evaluator`, whose tasks ([3]) have type
  `evaluator`; port 2222; extra fields `job`, `environment` and, in `task`,
  `trial` and `cloud`; not set for a single replica. Host names as in
  Vertex AI job logs: `cmle-training-workerpool0-<id>-0`.
- SageMaker: aws/sagemaker-tensorflow-training-toolkit,
  `src/sagemaker_tensorflow_container/training.py`:
  `_build_tf_config_for_mwms` (distribution `multi_worker_mirrored_strategy`):
  every host a `worker` on port 8890, plus `"environment": "cloud"`;
  `_build_tf_config_for_ps` (distribution `parameter_server`): `master` on
  2222, the other hosts `worker` on 2222, every host a `ps` on 2223. Hosts are
  SageMaker's `algo-1`, `algo-2`, ...
"""

import json

_TFJOB = "digits"
_VERTEX_ID = "3f6b9a1c2d"


def _tfjob_address(kind: str, index: int) -> str:
    return f"{_TFJOB}-{kind}-{index}.default.svc:2222"


def tfjob(replicas: dict[str, int], task: tuple[str, int]) -> str:
    """What the training operator sets for replica types like {"Chief": 1, "Worker": 1}."""
    cluster = {
        kind.lower(): [_tfjob_address(kind.lower(), i) for i in range(count)]
        for kind, count in sorted(replicas.items(), key=lambda kv: kv[0].lower())
    }
    return json.dumps(
        {
            "cluster": cluster,
            "task": {"type": task[0], "index": task[1]},
            "environment": "cloud",
        },
        separators=(",", ":"),
    )


def vertex(pools: dict[str, int], task: tuple[str, int], trial: str = "1") -> str:
    """What Vertex AI sets for worker pools like {"chief": 1, "worker": 1, "evaluator": 1}."""
    pool_of = {"chief": 0, "worker": 1, "ps": 2}
    cluster = {
        kind: [
            f"cmle-training-workerpool{pool_of[kind]}-{_VERTEX_ID}-{i}:2222" for i in range(count)
        ]
        for kind, count in sorted(pools.items())
        if kind != "evaluator"
    }
    return json.dumps(
        {
            "cluster": cluster,
            "environment": "cloud",
            "job": {"python_module": "trainer.task", "package_uris": [], "job_args": []},
            "task": {"cloud": _VERTEX_ID, "index": task[1], "trial": trial, "type": task[0]},
        }
    )


def sagemaker_mwms(hosts: int, index: int) -> str:
    """SageMaker's `multi_worker_mirrored_strategy`: every host a worker on port 8890."""
    return json.dumps(
        {
            "cluster": {"worker": [f"algo-{h + 1}:8890" for h in range(hosts)]},
            "environment": "cloud",
            "task": {"index": index, "type": "worker"},
        }
    )


def sagemaker_parameter_server(hosts: int, host: int) -> str:
    """SageMaker's `parameter_server` distribution, as the first host's worker process sees it."""
    names = [f"algo-{h + 1}" for h in range(hosts)]
    task = {"index": 0, "type": "master"} if host == 0 else {"index": host - 1, "type": "worker"}
    return json.dumps(
        {
            "cluster": {
                "master": [f"{names[0]}:2222"],
                "ps": [f"{n}:2223" for n in names],
                "worker": [f"{n}:2222" for n in names[1:]],
            },
            "environment": "cloud",
            "task": task,
        }
    )


def on_loopback(raw: str, ports: list[int]) -> str:
    """The same TF_CONFIG with each distinct address moved to 127.0.0.1 and a port of `ports`.

    The only change for running a layout's processes on one machine: a manager
    gives every process a host of its own (often with one port for all), and
    TensorFlow's gRPC server listens on `[::]:<port>`, so two processes of one
    machine need two ports.
    """
    config = json.loads(raw)
    addresses = [a for job in sorted(config["cluster"]) for a in config["cluster"][job]]
    moved = {a: f"127.0.0.1:{p}" for a, p in zip(dict.fromkeys(addresses), ports)}
    config["cluster"] = {
        job: [moved[a] for a in listed] for job, listed in config["cluster"].items()
    }
    return json.dumps(config)
