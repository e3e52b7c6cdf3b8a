"""Calling a Keras model on TensorFlow tensors, and loading trained weights for a tensor.

Shows, on TensorFlow 2 and Keras 3:

- a Keras model is a function of tensors: `model(tf_tensor)` returns a `tf.Tensor`,
  eagerly or inside a `tf.function`, like any TensorFlow op;
- building a model for a given input tensor and loading pre-trained weights into it.
  Keras 2 did this with `Input(tensor=...)`, which Keras 3 removed: now you build the
  same architecture for the tensor's shape, `load_weights` from the `.weights.h5`
  file that the trained model saved, and call it on the tensor.

Run: `python examples/model_on_tensors.py`
"""

import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from replicate.demo import load_digits


def make_model(input_shape: tuple[int, ...], batch_size: int | None = None) -> keras.Model:
    """The architecture, as a function of the input it will be called on."""
    inputs = keras.Input(input_shape, batch_size=batch_size, name="pixels")
    h = keras.layers.Dense(64, activation="relu")(inputs)
    h = keras.layers.BatchNormalization()(h)
    outputs = keras.layers.Dense(10, activation="softmax")(h)
    return keras.Model(inputs, outputs, name="digits_mlp")


keras.utils.set_random_seed(0)
(x_train, y_train), (x_test, y_test) = load_digits()

# The "pre-trained" model, trained with fit on numpy arrays; its weights are
# saved to a file below.
trained = make_model((64,))
trained.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
trained.fit(x_train.reshape(-1, 64), y_train, epochs=8, batch_size=32, verbose=0)

# A tensor produced by a TensorFlow input pipeline (here tf.data, once a queue):
# the test images, flattened by TensorFlow ops rather than by numpy.
pipeline = tf.data.Dataset.from_tensor_slices(x_test).map(lambda im: tf.reshape(im, [-1]))
tensor = next(iter(pipeline.batch(len(x_test))))
print(f"input tensor: tf.Tensor {isinstance(tensor, tf.Tensor)}, shape {tuple(tensor.shape)}")

# 1. A model called on a TF tensor gives a TF tensor; TF ops can follow it directly.
preds = trained(tensor, training=False)
assert isinstance(preds, tf.Tensor)
labels = tf.argmax(preds, axis=-1, output_type=tf.int32)
accuracy = float(tf.reduce_mean(tf.cast(labels == y_test, tf.float32)))
print(
    f"model(tensor) returns a tf.Tensor: {isinstance(preds, tf.Tensor)}, shape {tuple(preds.shape)}"
)
print(f"test accuracy: {accuracy:.4f}")
assert accuracy >= 0.9, accuracy


# The same call inside a traced graph, as part of a larger TensorFlow computation.
@tf.function
def predicted_labels(images: tf.Tensor) -> tf.Tensor:
    return tf.argmax(trained(images, training=False), axis=-1, output_type=tf.int32)


assert np.array_equal(predicted_labels(tensor), labels)

# 2. A model built for this very tensor (its static shape, batch size included),
# with the pre-trained weights loaded from the file.
fresh = make_model(tuple(tensor.shape[1:]), batch_size=tensor.shape[0])
assert not np.array_equal(fresh(tensor), preds)  # Random initial weights so far.
with tempfile.TemporaryDirectory() as workdir:
    weights_path = Path(workdir) / "digits_mlp.weights.h5"
    trained.save_weights(weights_path)
    fresh.load_weights(weights_path)
restored = fresh(tensor, training=False)
identical = bool(np.array_equal(restored, preds))
print(f"fresh model input shape: {fresh.input_shape}")
print(f"identical predictions after load_weights: {identical}")
assert identical
# Loading copied the BatchNormalization moving statistics too, not just the
# trainable weights, which is why inference matches exactly.
assert all(np.array_equal(a, b) for a, b in zip(fresh.get_weights(), trained.get_weights()))
