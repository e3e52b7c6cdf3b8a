"""Export for TensorFlow Serving: train, export a versioned SavedModel, load and query it.

`replicate.export_saved_model` (also `replicate export MODEL.keras EXPORT_BASE`) writes
`EXPORT_BASE/<version>/` in inference mode with a `serving_default` signature (named
inputs and outputs) and, for classifiers, a `classify` signature (top class and scores).
Point TensorFlow Serving at EXPORT_BASE:

    tensorflow_model_server --rest_api_port=8501 --model_name=digits \\
        --model_base_path=/absolute/path/to/EXPORT_BASE

Run: `python examples/export_for_serving.py [EXPORT_BASE]` (default: ./serving/digits)
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import replicate  # noqa: E402
from replicate.demo import load_digits, make_convnet  # noqa: E402
from replicate.export import export_saved_model  # noqa: E402

devices = replicate.simulate_devices(2) if not tf.config.list_physical_devices("GPU") else None
export_base = sys.argv[1] if len(sys.argv) > 1 else os.path.join("serving", "digits")

keras.utils.set_random_seed(0)
(x_train, y_train), (x_test, y_test) = load_digits()
with tf.device("/cpu:0"):
    model = make_convnet()
parallel = replicate.replicate(model, devices)
parallel.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
parallel.fit(x_train, y_train, batch_size=64, epochs=8, verbose=0)

path = export_saved_model(parallel, export_base)  # the next free version number
print(f"exported version: {path}")

# What a server does: load the SavedModel and call its signatures by name.
served = tf.saved_model.load(path)
print(f"signatures: {sorted(served.signatures)}")
scores = served.signatures["serving_default"](image=tf.constant(x_test))["digit"].numpy()
top = served.signatures["classify"](image=tf.constant(x_test))["classes"].numpy()
difference = float(np.abs(scores - parallel.predict(x_test, verbose=0)).max())
print(f"max |served - predict|: {difference:.2e}")
assert difference <= 1e-5
print(f"served test accuracy: {float(np.mean(top == y_test)):.4f}")
