"""export_saved_model: TensorFlow Serving's layout, signatures, atomic writes."""

import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

import replicate
from replicate.export import export_saved_model

BIN = Path(sys.executable).parent


class Fragile(keras.layers.Layer):
    """Passes its input through; raises while `broken` is set (a failing export)."""

    broken = False

    def call(self, x):
        if Fragile.broken:
            raise RuntimeError("this layer cannot be traced right now")
        return x


def _trained_classifier(devices):
    keras.utils.set_random_seed(4)
    inputs = keras.Input((6,), name="features")
    h = keras.layers.Dense(16, activation="relu")(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Dropout(0.5)(h)
    h = Fragile()(h)
    outputs = keras.layers.Dense(3, activation="softmax", name="probabilities")(h)
    model = keras.Model(inputs, outputs)
    parallel = replicate.replicate(model, devices[:2])
    parallel.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(64, 6)) * 3 + 1).astype("float32")
    parallel.fit(x, rng.integers(0, 3, 64), batch_size=16, epochs=2, verbose=0)
    return parallel, x


@pytest.fixture
def exported(devices, tmp_path):
    parallel, x = _trained_classifier(devices)
    path = export_saved_model(parallel, tmp_path / "serving")
    return parallel, x, Path(path)


def test_layout_and_signatures(exported):
    _, _, path = exported
    assert path.name == "1" and (path / "saved_model.pb").is_file()
    shown = subprocess.run(
        [BIN / "saved_model_cli", "show", "--dir", path, "--all"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    serving = shown.split("signature_def['serving_default']")[1]
    assert "inputs['features']" in serving and "outputs['probabilities']" in serving
    classify = shown.split("signature_def['classify']")[1].split("signature_def[")[0]
    assert "outputs['classes']" in classify and "DT_INT64" in classify
    assert "outputs['scores']" in classify


def test_fresh_process_gets_predict_outputs_in_inference_mode(exported, tmp_path):
    parallel, x, path = exported
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(
        f"""
        import json, numpy as np, tensorflow as tf
        loaded = tf.saved_model.load({str(path)!r})
        x = tf.constant(np.load({str(tmp_path / "x.npy")!r}))
        out = loaded.signatures["serving_default"](features=x)
        cls = loaded.signatures["classify"](features=x)
        np.save({str(tmp_path / "p.npy")!r}, out["probabilities"].numpy())
        np.save({str(tmp_path / "c.npy")!r}, cls["classes"].numpy())
        np.save({str(tmp_path / "s.npy")!r}, cls["scores"].numpy())
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    expected = parallel.predict(x, verbose=0)
    served = np.load(tmp_path / "p.npy")
    # Twice the same inputs: Dropout is off and BatchNorm uses its moving statistics.
    assert np.abs(served - expected).max() <= 1e-5
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), expected.argmax(axis=1))
    assert np.abs(np.load(tmp_path / "s.npy") - expected).max() <= 1e-5


def test_versions_count_up_and_existing_ones_are_refused(exported):
    parallel, _, path = exported
    base = path.parent
    assert export_saved_model(parallel.template, base) == str(base / "2")
    with pytest.raises(FileExistsError, match=r"Version 1 already exists.*overwrite=True.*\(3\)"):
        export_saved_model(parallel, base, version=1)
    before = (path / "saved_model.pb").stat().st_mtime_ns
    assert export_saved_model(parallel, base, version=1, overwrite=True) == str(path)
    assert (path / "saved_model.pb").stat().st_mtime_ns != before
    assert sorted(p.name for p in base.iterdir()) == ["1", "2"]


def test_a_failed_export_leaves_nothing_behind(exported):
    parallel, _, path = exported
    base = path.parent
    original = sorted(p.relative_to(base) for p in base.rglob("*"))
    Fragile.broken = True
    try:
        with pytest.raises(RuntimeError, match="cannot be traced"):
            export_saved_model(parallel, base)
        with pytest.raises(RuntimeError, match="cannot be traced"):
            export_saved_model(parallel, base, version=1, overwrite=True)
    finally:
        Fragile.broken = False
    assert sorted(p.relative_to(base) for p in base.rglob("*")) == original


@pytest.mark.parametrize("bad", [0, -2, "3", 1.5, True])
def test_bad_versions(bad, exported):
    parallel, _, path = exported
    with pytest.raises(ValueError, match=r"positive integer.*Received: version="):
        export_saved_model(parallel, path.parent, version=bad)


def test_not_a_model(tmp_path):
    with pytest.raises(TypeError, match=r"Received: model='model.keras' of type str"):
        export_saved_model("model.keras", tmp_path)


def test_cli_export(tmp_path):
    saved = tmp_path / "model.keras"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="probs")]).save(saved)
    cli = BIN / "replicate"
    result = subprocess.run(
        [cli, "export", saved, tmp_path / "cli", "--version", "7"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "cli" / "7" / "saved_model.pb").is_file()
    again = subprocess.run(
        [cli, "export", saved, tmp_path / "cli", "--version", "7"], capture_output=True, text=True
    )
    assert again.returncode == 1
    assert (
        "version 7 already exists" in again.stderr
        and "Add --overwrite to replace it, or leave out --version" in again.stderr
        and "overwrite=True" not in again.stderr
    )
    # A Sequential's output is named after its last layer, as a functional model's.
    shown = subprocess.run(
        [BIN / "saved_model_cli", "show", "--dir", tmp_path / "cli" / "7", "--all"],
        capture_output=True,
        text=True,
    )
    assert "outputs['probs']" in shown.stdout, shown.stdout[-2000:]
    missing = subprocess.run(
        [cli, "export", tmp_path / "nope.keras", tmp_path / "cli"], capture_output=True, text=True
    )
    assert missing.returncode == 1 and "no model file at" in missing.stderr
