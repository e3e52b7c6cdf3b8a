"""What listens during a job (the README's Security table), and model files load in safe mode.

The listening sockets are read from /proc while a real 2-process job runs:
`replicate launch --nproc 2` (collective backend) and `horovodrun -np 2 -H
localhost:2 --gloo`. Each worker reports its own sockets after one training
step (tests/listen_worker.py); the test reads the launcher's meanwhile.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import keras
import listen_worker
import numpy as np
import pytest

import replicate

WORKER = Path(listen_worker.__file__)
BIN = Path(sys.executable).parent

try:
    import horovod.tensorflow as _hvd

    HOROVOD_SKIP = None if _hvd.gloo_built() else "this Horovod was built without Gloo"
except ImportError as error:
    HOROVOD_SKIP = (
        f"Horovod is not installed in this environment ({error}); `make horovod` builds it"
    )


def _run_job(command, out, timeout=300):
    """Starts the job; once both workers reported, reads the launcher's sockets, then
    lets the workers finish. Returns (launcher sockets, reports by rank, output)."""
    environ = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PATH=f"{BIN}:{os.environ['PATH']}")
    job = subprocess.Popen(
        command,
        cwd=WORKER.parent,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + timeout
    reports = [out / f"listen_rank{r}.json" for r in (0, 1)]
    try:
        while not all(p.exists() for p in reports):
            assert job.poll() is None, job.stdout.read()[-5000:]
            assert time.monotonic() < deadline, "the workers did not report in time"
            time.sleep(0.5)
        launcher = listen_worker.listening_sockets(job.pid)
        (out / "release").touch()
        output, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, output[-5000:]
    return launcher, [json.loads(p.read_text()) for p in reports], output


@pytest.mark.processes
def test_single_host_replicate_launch_listens_only_on_tensorflows_grpc_ports(tmp_path):
    command = [BIN / "replicate", "launch", "--nproc", "2", "--"]
    command += [sys.executable, WORKER, "collective", tmp_path, "120"]
    launcher, ranks, _ = _run_job(command, tmp_path)
    # The launcher itself listens on nothing.
    assert launcher == []
    cluster = json.loads(ranks[0]["tf_config"])["cluster"]["worker"]
    # What the launcher chooses is on the loopback interface ...
    hosts = {address.rsplit(":", 1)[0] for address in cluster}
    assert hosts == {"127.0.0.1"}
    for rank, report in enumerate(ranks):
        port = int(cluster[rank].rsplit(":", 1)[1])
        # ... but TensorFlow's gRPC server takes only the port from TF_CONFIG and
        # listens on every interface, IPv6 and (dual-stack) IPv4: one socket, [::]:port.
        assert report["listen"] == [["::", port]], report


@pytest.mark.processes
@pytest.mark.horovod
@pytest.mark.skipif(HOROVOD_SKIP is not None, reason=str(HOROVOD_SKIP))
def test_horovodrun_listens_on_every_interface_and_gloo_closes_its_listener(tmp_path):
    command = [BIN / "horovodrun", "-np", "2", "-H", "localhost:2", "--gloo"]
    command += [sys.executable, WORKER, "horovod", tmp_path, "120"]
    launcher, ranks, _ = _run_job(command, tmp_path)
    # horovodrun's rendezvous server: one socket on all IPv4 interfaces, a random port.
    assert len(launcher) == 1 and launcher[0][0] == "0.0.0.0", launcher
    assert 1024 <= launcher[0][1] < 65536
    # Gloo's listener (127.0.0.1 for -H localhost) is gone once the ranks are connected.
    assert [report["listen"] for report in ranks] == [[], []]


def _lambda_model_file(tmp_path):
    inputs = keras.Input((3,))
    outputs = keras.layers.Lambda(lambda t: t * 2.0)(keras.layers.Dense(2)(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="mse")
    path = tmp_path / "lambda.keras"
    model.save(path)
    return path


def test_export_refuses_code_in_a_model_file(tmp_path):
    path = _lambda_model_file(tmp_path)
    result = subprocess.run(
        [BIN / "replicate", "export", path, tmp_path / "serving"],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert result.returncode == 1
    assert "replicate export: error: " in result.stderr
    assert "Lambda" in result.stderr and "safe_mode=False" in result.stderr
    assert not (tmp_path / "serving").exists()


def test_loading_for_replicate_keeps_keras_safe_mode(tmp_path, devices):
    path = _lambda_model_file(tmp_path)
    with pytest.raises(ValueError, match=r"Lambda.*safe_mode=False"):
        replicate.replicate(keras.models.load_model(path), devices[:2])
    # Trusted on purpose, the same file loads and trains over towers.
    model = keras.models.load_model(path, safe_mode=False)
    parallel = replicate.replicate(model, devices[:2])
    history = parallel.fit(np.ones((4, 3)), np.ones((4, 2)), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
