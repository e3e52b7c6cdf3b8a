"""The benchmark suite in a tiny configuration: outputs, agreement check, errors."""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from replicate import threads
from replicate.bench import models, optimizers
from replicate.optimizers import NativeOptimizer

BENCH = Path(sys.executable).with_name("replicate-bench")
PNG = b"\x89PNG\r\n\x1a\n"


def _run(*args):
    return subprocess.run([BENCH, *map(str, args)], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_optimizers_outputs(tmp_path):
    result = _run(
        "optimizers",
        "--quick",
        "--optimizer",
        "sgd,adam",
        "--repeats",
        "1",
        "--steps",
        "2",
        "--batch",
        "16",
        "--devices",
        "2",
        "--processes",
        "1",
        "--output",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "optimizers.json").read_text())
    records = payload["records"]
    assert len(records) == 2 * 4 * 2  # optimizers x (1 or 2 devices, xla or not) x implementations
    for r in records:
        assert {
            "optimizer",
            "implementation",
            "jit_compile",
            "devices",
            "ms_per_step_median",
            "max_abs_weight_diff",
        } <= set(r)
        assert r["ms_per_step_median"] > 0
    assert {(r["implementation"], r["jit_compile"], r["devices"]) for r in records} == {
        (i, j, d) for i in ("keras", "native") for j in (False, True) for d in (1, 2)
    }
    sgd = next(r for r in records if r["optimizer"] == "sgd")
    assert sgd["max_abs_weight_diff"] <= 1e-5
    assert payload["machine"]["cores"] >= 1 and payload["machine"]["tensorflow"]
    table = (tmp_path / "optimizers.md").read_text()
    assert "| optimizer | jit_compile | devices | keras ms/step" in table
    assert (tmp_path / "optimizers.png").read_bytes().startswith(PNG)


@pytest.mark.slow
def test_scaling_outputs_with_every_peer(tmp_path):
    result = _run(
        "scaling",
        "--model",
        "mlp",
        "--repeats",
        "1",
        "--steps",
        "2",
        "--batch",
        "16",
        "--devices",
        "2",
        "--processes",
        "1",
        "--output",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "scaling.json").read_text())
    seen = {(r["method"], r["devices"]) for r in payload["records"]}
    assert seen == {
        ("fit", 1),
        ("replicate", 1),
        ("replicate", 2),
        ("mirrored", 1),
        ("mirrored", 2),
        ("horovod", 2),
        ("collective", 2),
    }
    for r in payload["records"]:
        assert r["examples_per_second"] == pytest.approx(
            16 / (r["ms_per_step_median"] / 1000), rel=1e-2
        )
        if r["method"] not in ("horovod", "collective") and r["devices"] == 1:
            assert r["scaling_efficiency"] == 1.0
    assert "towers are simulated CPU devices" in (tmp_path / "scaling.md").read_text()
    assert (tmp_path / "scaling.png").read_bytes().startswith(PNG)


@pytest.mark.slow
def test_agreement_token_cost_outputs(tmp_path):
    result = _run(
        "agreement", "--steps", "5", "--repeats", "1", "--processes", "1", "--output", tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "agreement.json").read_text())
    for backend, rows in payload["records"].items():
        assert backend in ("collective", "horovod")
        for key in ("without token", "with token"):
            assert len(rows[key]["samples"]) == 1 and rows[key]["ms_per_step_best"] > 0
        assert rows["paired_ratio_median"] > 0
    table = (tmp_path / "agreement.md").read_text()
    assert "| collective | with token |" in table and "cost (median of paired rounds)" in table


@pytest.mark.slow
@pytest.mark.parametrize("command", ["startup", "overhead"])
def test_startup_and_overhead_outputs(command, tmp_path):
    extra = (
        ["--model", "mlp", "--phases"]
        if command == "startup"
        else ["--steps", "5", "--repeats", "1"]
    )
    result = _run(command, *extra, "--devices", "2", "--processes", "1", "--output", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / f"{command}.json").read_text())
    unit = "seconds" if command == "startup" else "ms_per_step"
    cells = {(r["method"], r["towers"]): r[f"{unit}_best"] for r in payload["records"]}
    methods = ["mirrored", "replicate"]
    if command == "startup":  # --phases: replicate again, in processes with Grappler off
        methods.append("replicate, Grappler off")
    assert sorted(cells) == [(m, n) for m in methods for n in (1, 2)]
    assert all(value > 0 for value in cells.values())
    table = (tmp_path / f"{command}.md").read_text()
    assert "| replicate | " in table and "| mirrored | " in table
    assert ("take" if command == "startup" else "ms per added tower") in table
    assert payload["machine"]["replicate"] == importlib.metadata.version("keras-replicate")
    if command == "startup":
        by = {(r["method"], r["towers"]): r for r in payload["records"]}
        assert [by["replicate", n]["grappler"] for n in (1, 2)] == [True, True]
        assert [by["replicate, Grappler off", n]["grappler"] for n in (1, 2)] == [False, False]
        two = by["replicate", 2]
        assert 0 < two["again_median"] < two["seconds_median"]
        assert 0 < two["traced_median"] < two["seconds_median"]
        assert "| towers | first fit | tracing | Grappler | the step | the rest |" in table
        assert "\n| 2 | " in table.split("## Where replicate's first step goes")[1]


def test_the_synchronized_startup_model_synchronizes_every_batchnorm():
    import keras

    from replicate.bench import startup

    def synchronized(name):
        norms = [
            layer
            for layer in startup._model(name).layers
            if isinstance(layer, keras.layers.BatchNormalization)
        ]
        return len(norms), {layer.synchronized for layer in norms}

    assert synchronized("resnet-sync") == (synchronized("resnet")[0], {True})
    assert synchronized("resnet")[1] == {False}


@pytest.mark.slow
def test_profile_outputs(tmp_path):
    result = _run("profile", "--steps", "5", "--repeats", "1", "--output", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "profile.json").read_text())
    share = max(1, threads.cores() // 2)  # 2 processes on this host (replicate.threads)
    assert "collective" in payload["records"]
    for backend, rows in payload["records"].items():
        assert rows["threads"] == share
        for key in ("replicated step", "local step", "exchange alone"):
            assert rows[key]["ms_per_step_best"] > 0, (backend, key)
    assert f"| collective | {share} | " in (tmp_path / "profile.md").read_text()


def test_agreement_detects_a_wrong_learning_rate():
    spec = {"model": "mlp", "hidden": 32, "batch": 16, "steps": 5}
    x, y = models.data("mlp", 16 * 5)
    assert optimizers.agreement(spec, "sgd", x, y) <= 1e-6
    wrong = NativeOptimizer("sgd", learning_rate=0.02)  # the benchmark's rate is 0.01
    assert optimizers.agreement(spec, "sgd", x, y, native=wrong) > 1e-4
    assert np.isfinite(optimizers.agreement(spec, "adam", x, y))


@pytest.mark.parametrize(
    "args, message",
    [
        (["scaling", "--model", "vgg"], "unknown vgg; choose from mlp, convnet, resnet"),
        (["optimizers", "--optimizer", "sgd,lamb"], "unknown lamb; choose from sgd"),
        (["scaling", "--devices", "0"], "--devices: must be a positive integer, got '0'"),
        (["bogus"], "invalid choice: 'bogus'"),
    ],
)
def test_bad_options(args, message):
    result = _run(*args)
    assert result.returncode == 2
    assert message in result.stderr
