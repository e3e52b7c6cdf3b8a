"""Who a process is: the launcher's environment and TF_CONFIG."""

import json

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
    assert [c["task"]["index"] for c in configs] == [0, 1]
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in envs] == [
        ("0", "0", "2"),
        ("1", "1", "2"),
    ]


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
