"""Who a process is: the launcher's environment and TF_CONFIG."""

import json
import re

import cluster_layouts as layouts
import pytest

from replicate import cluster, launch


def _config(**task):
    return json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:2", "c:3"]}, "task": task})


def test_tf_config_ranks_the_chief_first():
    found = cluster.tf_config({"TF_CONFIG": _config(type="worker", index=1)})
    assert found.addresses == ["a:1", "b:2", "c:3"]
    assert found.rank == 2 and found.size == 3
    assert found.leader == "/job:chief/replica:0/task:0"


@pytest.mark.parametrize(
    "raw, message",
    [
        (None, r"TF_CONFIG environment variable, which is not set.*replicate launch"),
        ("{not json", r"is not valid JSON.*Read: TF_CONFIG='\{not json'"),
        (
            '{"cluster": {"ps": ["a:1"]}, "task": {"type": "ps", "index": 0}}',
            r"has parameter servers \(job 'ps'\)",
        ),
        (
            '{"cluster": {"trainer": ["a:1"]}, "task": {"type": "trainer", "index": 0}}',
            r"names jobs \['trainer'\]",
        ),
        ('{"cluster": {"worker": ["a"]}, "task": {"type": "worker", "index": 0}}', r"'host:port'"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}', r"index 3"),
        ('{"cluster": {"worker": ["a:1"]}}', r"has no 'task'"),
    ],
)
def test_bad_tf_config_shows_what_was_read(raw, message):
    environ = {} if raw is None else {"TF_CONFIG": raw}
    with pytest.raises(ValueError, match=message):
        cluster.tf_config(environ)


def test_rank_from_launcher_or_tf_config(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "HOROVOD_RANK", "HOROVOD_SIZE", "TF_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    assert (cluster.process_rank(), cluster.process_count(), cluster.is_chief()) == (0, 1, True)
    monkeypatch.setenv("TF_CONFIG", _config(type="worker", index=0))
    assert (cluster.process_rank(), cluster.process_count(), cluster.is_chief()) == (1, 3, False)
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match=r"RANK must be an integer. Received: RANK='x'"):
        cluster.process_rank()


def test_launch_environments_one_host():
    envs = launch.environments(2)
    configs = [json.loads(e["TF_CONFIG"]) for e in envs]
    assert configs[0]["cluster"] == configs[1]["cluster"]
    # One host: the addresses are on the loopback interface.
    assert all(a.startswith("127.0.0.1:") for a in configs[0]["cluster"]["worker"])
    assert [c["task"]["index"] for c in configs] == [0, 1]
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in envs] == [
        ("0", "0", "2"),
        ("1", "1", "2"),
    ]
    assert all(e[launch.LAUNCHED] == "1" for e in envs)


def test_a_lost_process_message_names_what_started_the_job(monkeypatch):
    # A job a cluster manager started (TF_CONFIG alone) is not a `replicate launch` job.
    from replicate.backends.collective import CollectiveBackend

    launcher = CollectiveBackend.launcher.fget
    monkeypatch.setenv(launch.LAUNCHED, "1")
    assert launcher(None) == "replicate launch"
    monkeypatch.delenv(launch.LAUNCHED)
    assert launcher(None) == "TF_CONFIG"


def test_launch_environments_several_hosts():
    envs = launch.environments(2, hosts=["a", "b"], node_rank=1, port=29400)
    assert json.loads(envs[0]["TF_CONFIG"])["cluster"]["worker"] == [
        "a:29400",
        "a:29401",
        "b:29400",
        "b:29401",
    ]
    assert [e["RANK"] for e in envs] == ["2", "3"]
    with pytest.raises(ValueError, match=r"Several hosts need a fixed `--port`"):
        launch.environments(2, hosts=["a", "b"])
    with pytest.raises(ValueError, match=r"node_rank=2"):
        launch.environments(2, hosts=["a", "b"], node_rank=2, port=1)


def test_launch_command_line_errors(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("replicate")
    result = subprocess.run([script, "launch", "--nproc", "2"], capture_output=True, text=True)
    assert result.returncode == 1 and "No command to launch" in result.stderr
    bad = tmp_path / "fails.py"
    bad.write_text(
        "import os, sys\nprint('rank', os.environ['RANK'])\nsys.exit(int(os.environ['RANK']) * 3)\n"
    )
    result = subprocess.run(
        [script, "launch", "--nproc", "2", "--", sys.executable, bad],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 3
    assert "[0] rank 0" in result.stdout and "[1] rank 1" in result.stdout
    assert "replicate launch: process 1 of 2 exited with status 3" in result.stderr
    # A script by itself runs under the launcher's Python, as torchrun runs it.
    result = subprocess.run(
        [script, "launch", "--nproc", "2", bad], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 3, result.stderr
    assert "[0] rank 0" in result.stdout and "[1] rank 1" in result.stdout


@pytest.mark.parametrize(
    "program, expected",
    [
        ("missing.py", r"The script 'missing.py' does not exist \(looked in "),
        ("no-such-program", r"Cannot run 'no-such-program': no executable file .* on PATH"),
        ("./plain.txt", r"Cannot run './plain.txt': no executable file .* at that path"),
        ("folder.py", r"The script 'folder.py' is a directory \(looked in "),
        ("./no_interpreter", r"Cannot run './no_interpreter': No such file or directory \(the "),
        ("./no_first_line", r"Cannot run './no_first_line': Exec format error \(the file is"),
    ],
)
def test_launch_names_a_command_it_cannot_run(program, expected, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "plain.txt").write_text("not a program\n")  # not executable
    (tmp_path / "folder.py").mkdir()
    for name, text in [("no_interpreter", "#!/no/such/python\n"), ("no_first_line", "print(1)\n")]:
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)  # executable, but the system cannot start it
    script = Path(sys.executable).with_name("replicate")
    result = subprocess.run(
        [script, "launch", "--nproc", "2", "--", program, "--flag"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert re.search(expected, result.stderr), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""  # no process started


# -- the cluster managers' layouts (tests/cluster_layouts.py cites the sources) --------


def _read(raw):
    return cluster.tf_config({"TF_CONFIG": raw})


def test_tfjob_chief_workers_and_an_evaluator_in_cluster():
    replicas = {"Chief": 1, "Worker": 2, "Evaluator": 1}
    chief = _read(layouts.tfjob(replicas, ("chief", 0)))
    assert chief.rank == 0 and chief.size == 3
    assert chief.addresses == [
        "digits-chief-0.default.svc:2222",
        "digits-worker-0.default.svc:2222",
        "digits-worker-1.default.svc:2222",
    ]
    # The evaluator is not handed to TensorFlow's runtime: it takes no part in training.
    assert sorted(chief.jobs) == ["chief", "worker"]
    second = _read(layouts.tfjob(replicas, ("worker", 1)))
    assert (second.rank, second.task, second.leader) == (
        2,
        ("worker", 1),
        "/job:chief/replica:0/task:0",
    )


def test_tfjob_workers_only_and_a_master():
    workers = _read(layouts.tfjob({"Worker": 2}, ("worker", 1)))
    assert (workers.rank, workers.size) == (1, 2)
    master = _read(layouts.tfjob({"Master": 1, "Worker": 1}, ("master", 0)))
    assert (master.rank, master.size, master.leader) == (0, 2, "/job:master/replica:0/task:0")
    worker = _read(layouts.tfjob({"Master": 1, "Worker": 1}, ("worker", 0)))
    assert worker.rank == 1


def test_vertex_ai_chief_and_workers_with_its_extra_fields():
    pools = {"chief": 1, "worker": 2}
    found = _read(layouts.vertex(pools, ("worker", 0)))
    assert (found.rank, found.size) == (1, 3)
    assert found.addresses[0] == "cmle-training-workerpool0-3f6b9a1c2d-0:2222"
    assert _read(layouts.vertex(pools, ("chief", 0), trial="7")).rank == 0


def test_sagemaker_multi_worker_mirrored_strategy():
    found = _read(layouts.sagemaker_mwms(3, 2))
    assert (found.rank, found.size) == (2, 3)
    assert found.addresses == ["algo-1:8890", "algo-2:8890", "algo-3:8890"]


@pytest.mark.parametrize(
    "raw",
    [
        layouts.tfjob({"Chief": 1, "Worker": 1, "Evaluator": 1}, ("evaluator", 0)),
        layouts.vertex({"chief": 1, "worker": 1, "evaluator": 1}, ("evaluator", 0)),
    ],
    ids=["tfjob", "vertex"],
)
def test_an_evaluator_task_is_told_what_to_change(raw):
    with pytest.raises(ValueError) as error:
        _read(raw)
    message = str(error.value)
    assert "makes this process the job's evaluator" in message
    assert "TFJob `Evaluator` replica" in message and "workerPoolSpecs[3]" in message
    assert "Remove the evaluator from the job spec" in message
    assert f"Read: TF_CONFIG={raw!r}" in message


@pytest.mark.parametrize(
    "raw",
    [
        layouts.tfjob({"Chief": 1, "Worker": 1, "PS": 1}, ("worker", 0)),
        layouts.vertex({"chief": 1, "worker": 1, "ps": 1}, ("chief", 0)),
        layouts.sagemaker_parameter_server(2, 0),
        layouts.sagemaker_parameter_server(2, 1),
    ],
    ids=["tfjob", "vertex", "sagemaker-master", "sagemaker-worker"],
)
def test_parameter_servers_are_refused_with_what_to_change(raw):
    with pytest.raises(ValueError) as error:
        _read(raw)
    message = str(error.value)
    assert "has parameter servers (job 'ps')" in message
    assert "remove the `PS` replica spec" in message
    assert "workerPoolSpecs[2]" in message
    assert "multi_worker_mirrored_strategy" in message


def test_tfjob_sparse_cluster_is_refused():
    raw = json.dumps(
        {
            "cluster": {"worker": {"1": "digits-worker-1.default.svc:2222"}, "ps": []},
            "task": {"type": "worker", "index": 1},
        }
    )
    with pytest.raises(ValueError, match=r"has parameter servers"):
        _read(raw)
    raw = json.dumps(
        {"cluster": {"worker": {"1": "w1:2222"}}, "task": {"type": "worker", "index": 1}}
    )
    with pytest.raises(ValueError, match=r"enableDynamicWorker: false"):
        _read(raw)


def test_chief_and_master_together_are_refused():
    raw = json.dumps(
        {
            "cluster": {"chief": ["a:1"], "master": ["b:1"], "worker": ["c:1"]},
            "task": {"type": "worker", "index": 0},
        }
    )
    with pytest.raises(ValueError, match=r"more than one chief"):
        _read(raw)
