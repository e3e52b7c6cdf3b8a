"""Keras layers as a simplified interface to TensorFlow: layers called on TF tensors.

Shows, on TensorFlow 2 and Keras 3 (no sessions, no placeholders):

- Keras layers called directly on `tf.Tensor`s inside a `tf.function` train step,
  with the loss written in TensorFlow and the update done by a native TensorFlow
  optimizer (`tf.compat.v1.train.AdamOptimizer`) on the layers' `tf.Variable`s;
- a Keras metric (`SparseCategoricalAccuracy`) evaluating the result;
- train versus inference behaviour (the old "learning phase"), now the
  `training=` argument: Dropout and BatchNormalization in both modes.

Run: `python examples/keras_layers_on_tf_tensors.py`
"""

import keras
import numpy as np
import tensorflow as tf

from replicate.demo import load_digits

keras.utils.set_random_seed(0)
(x_train, y_train), (x_test, y_test) = load_digits()
x_train, x_test = x_train.reshape(-1, 64), x_test.reshape(-1, 64)

# Plain layer objects, not a model: each call below applies them to a TF tensor.
hidden = keras.layers.Dense(128, activation="relu")
dropout = keras.layers.Dropout(0.2)
classifier = keras.layers.Dense(10, activation="softmax")


def forward(images: tf.Tensor, training: bool) -> tf.Tensor:
    """The network as a function of a TF tensor; `training` replaces the learning phase."""
    return classifier(dropout(hidden(images), training=training))


# Calling once eagerly creates the weights outside any traced function, so the
# optimizer below can be handed the complete variable list.
forward(tf.zeros((1, 64)), training=False)
keras_variables = hidden.trainable_variables + classifier.trainable_variables
# On the TensorFlow backend each Keras variable wraps a real `tf.Variable`
# (`.value`), which is what a native TensorFlow optimizer updates.
tf_variables = [v.value for v in keras_variables]
assert all(isinstance(v, tf.Variable) for v in tf_variables)
optimizer = tf.compat.v1.train.AdamOptimizer(learning_rate=2e-3)


@tf.function
def train_step(images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    with tf.GradientTape() as tape:
        preds = forward(images, training=True)
        # A Keras loss function on TF tensors returns a TF tensor per sample.
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, preds))
    grads = tape.gradient(loss, tf_variables)
    optimizer.apply_gradients(zip(grads, tf_variables))
    return loss


dataset = tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(2048, seed=0).batch(32)
# Shuffled afresh for each of the 10 epochs.
for images, labels in dataset.repeat(10):
    loss = train_step(images, labels)
print(f"final training loss: {float(loss):.4f}")

accuracy = keras.metrics.SparseCategoricalAccuracy()
accuracy.update_state(y_test, forward(tf.constant(x_test), training=False))
test_accuracy = float(accuracy.result())
print(f"test accuracy: {test_accuracy:.4f}")
assert test_accuracy >= 0.9, test_accuracy

# --- Dropout: random masking while training, the identity at inference. ---
ones = tf.ones((4, 100))
drop = keras.layers.Dropout(0.5, seed=1)
train_out, infer_out = drop(ones, training=True).numpy(), drop(ones, training=False).numpy()
# Kept units are scaled by 1 / (1 - rate), so the expected activation is unchanged.
assert set(np.unique(train_out)) == {0.0, 2.0}
assert np.array_equal(infer_out, ones.numpy())
differs = not np.array_equal(train_out, infer_out)
print(f"dropout differs between training=True and training=False: {differs}")

# --- BatchNormalization: batch statistics while training, moving ones at inference. ---
batch = tf.constant(np.random.default_rng(0).normal(3.0, 2.0, size=(256, 5)), tf.float32)
bn = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3)
bn.build(batch.shape)
bn.gamma.assign(np.linspace(0.5, 1.5, 5))
bn.beta.assign(np.linspace(-1.0, 1.0, 5))
trained = bn(batch, training=True).numpy()
# Training normalises with this batch's mean and variance...
assert np.allclose(((trained - bn.beta.numpy()) / bn.gamma.numpy()).mean(axis=0), 0.0, atol=1e-5)
# ...and moves the moving statistics 10% of the way towards them (momentum 0.9).
expected_mean = 0.1 * batch.numpy().mean(axis=0)
assert np.allclose(bn.moving_mean.numpy(), expected_mean, atol=1e-6)

# Inference uses the moving statistics only; the batch's own are ignored.
inferred = bn(batch, training=False).numpy()
mean, var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
manual = (batch.numpy() - mean) / np.sqrt(var + bn.epsilon) * bn.gamma.numpy() + bn.beta.numpy()
diff = float(np.abs(inferred - manual).max())
print(
    "batchnorm training=False matches the moving-statistics formula: "
    f"{diff <= 1e-5} (max diff {diff:.2e})"
)
assert diff <= 1e-5, diff
assert not np.allclose(trained, inferred)
