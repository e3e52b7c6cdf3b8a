"""The cluster managers' TF_CONFIG layouts, run as real processes of the collective backend.

Each test starts the processes of one job itself, as the manager would, each
with nothing but its TF_CONFIG: the manager's exact layout (job names, task
types, evaluator entries, extra fields; tests/cluster_layouts.py cites where
each comes from), with its addresses moved to free ports of 127.0.0.1
(`cluster_layouts.on_loopback`). The training processes must end with
identical weights, the chief (or master, or worker 0) as rank 0; an evaluator
process must stop at once with the error that says what to change.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import cluster_layouts as layouts
import numpy as np
import pytest
import tf_config_worker

from replicate.launch import free_ports

pytestmark = [pytest.mark.processes, pytest.mark.slow]

WORKER = Path(tf_config_worker.__file__)
# What a launcher would add; a cluster manager sets TF_CONFIG only.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "REPLICATE_LAUNCH")


def _run(configs: dict[tuple[str, int], str], out: Path, timeout=600):
    """Starts one process per task with its TF_CONFIG; returns {task: (status, stderr)}."""
    ports = free_ports(len(configs) + 1)
    environ = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    processes = {
        task: subprocess.Popen(
            [sys.executable, WORKER, out],
            cwd=WORKER.parent,
            env={**environ, "TF_CONFIG": layouts.on_loopback(raw, ports)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for task, raw in configs.items()
    }
    try:
        return {task: (p.wait(timeout), p.stderr.read()) for task, p in processes.items()}
    finally:
        for p in processes.values():
            if p.poll() is None:
                p.kill()


def _check_training(out, results, tasks):
    """The training tasks, in rank order: status 0, ranks 0..n-1, identical weights."""
    for task in tasks:
        status, stderr = results[task]
        assert status == 0, f"{task}: {stderr[-4000:]}"
    reports = [json.loads((out / f"{t}_{i}.json").read_text()) for t, i in tasks]
    assert [r["rank"] for r in reports] == list(range(len(tasks)))
    assert [r["is_chief"] for r in reports] == [True] + [False] * (len(tasks) - 1)
    assert all(r["size"] == len(tasks) for r in reports)
    weights = [np.load(out / f"{t}_{i}.npz") for t, i in tasks]
    for other in weights[1:]:
        for key in weights[0].files:
            np.testing.assert_array_equal(weights[0][key], other[key])
    assert reports[0]["loss"] == reports[1]["loss"]


def _check_evaluator_refused(results, task=("evaluator", 0)):
    status, stderr = results[task]
    assert status == 3, stderr[-4000:]
    assert "makes this process the job's evaluator" in stderr
    assert "Remove the evaluator from the job spec" in stderr


def test_kubeflow_tfjob_chief_worker_and_evaluator(tmp_path):
    replicas = {"Chief": 1, "Worker": 1, "Evaluator": 1}
    tasks = [("chief", 0), ("worker", 0), ("evaluator", 0)]
    results = _run({t: layouts.tfjob(replicas, t) for t in tasks}, tmp_path)
    _check_training(tmp_path, results, tasks[:2])
    _check_evaluator_refused(results)


def _manifest():
    import yaml

    path = WORKER.parent.parent / "examples" / "kubernetes" / "tfjob.yaml"
    return list(yaml.safe_load_all(path.read_text()))


def test_the_example_manifest_is_a_two_worker_collective_tfjob():
    job, policy = _manifest()
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "TFJob")
    specs = job["spec"]["tfReplicaSpecs"]
    assert list(specs) == ["Worker"] and specs["Worker"]["replicas"] == 2
    (container,) = specs["Worker"]["template"]["spec"]["containers"]
    assert container["name"] == "tensorflow"  # the container the operator configures
    assert container["command"][:4] == [
        "python",
        "examples/train_digits.py",
        "--backend",
        "collective",
    ]
    assert container["ports"] == [{"name": "tfjob-port", "containerPort": 2222}]
    # Only the job's own pods may reach the unauthenticated gRPC port.
    assert policy["kind"] == "NetworkPolicy"
    selector = {"training.kubeflow.org/job-name": job["metadata"]["name"]}
    assert policy["spec"]["podSelector"]["matchLabels"] == selector
    assert policy["spec"]["ingress"] == [
        {
            "from": [{"podSelector": {"matchLabels": selector}}],
            "ports": [{"protocol": "TCP", "port": 2222}],
        }
    ]


def test_kubeflow_tfjob_workers_as_in_the_example_manifest(tmp_path):
    replicas = {
        kind: spec["replicas"] for kind, spec in _manifest()[0]["spec"]["tfReplicaSpecs"].items()
    }
    tasks = [("worker", i) for i in range(replicas["Worker"])]
    results = _run({t: layouts.tfjob(replicas, t) for t in tasks}, tmp_path)
    _check_training(tmp_path, results, tasks)


def test_kubeflow_tfjob_master_and_worker(tmp_path):
    tasks = [("master", 0), ("worker", 0)]
    results = _run({t: layouts.tfjob({"Master": 1, "Worker": 1}, t) for t in tasks}, tmp_path)
    _check_training(tmp_path, results, tasks)


def test_vertex_ai_chief_worker_and_evaluator(tmp_path):
    pools = {"chief": 1, "worker": 1, "evaluator": 1}
    tasks = [("chief", 0), ("worker", 0), ("evaluator", 0)]
    results = _run({t: layouts.vertex(pools, t) for t in tasks}, tmp_path)
    _check_training(tmp_path, results, tasks[:2])
    _check_evaluator_refused(results)


def test_sagemaker_multi_worker_mirrored_strategy(tmp_path):
    tasks = [("worker", 0), ("worker", 1)]
    results = _run({t: layouts.sagemaker_mwms(2, t[1]) for t in tasks}, tmp_path)
    _check_training(tmp_path, results, tasks)
