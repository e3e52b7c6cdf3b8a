"""Data parallelism: replicas of one model on several devices, sharing one set of weights.

Shows, on TensorFlow 2 and Keras 3, with `replicate.ReplicaBuilder`:

- calling one model under several `tf.device` scopes makes replicas ("towers")
  that all read the same variables, which live once on the CPU;
- `builder.towers(x)` gives one output per device (each on its slice of the
  batch) and `builder.call(x)` merges them on the CPU: it equals `model(x)`;
- averaging two replicas' predictions on the CPU, as the 2016 tutorial did;
- training the shared weights over the towers with a native TensorFlow optimizer.

Run: `python examples/replicas_shared_weights.py`
"""

import keras
import numpy as np
import tensorflow as tf

import replicate
from replicate.demo import load_digits

# Must run before TensorFlow touches any device.
GPUS = tf.config.list_physical_devices("GPU")
DEVICES = ["/gpu:0", "/gpu:1"] if len(GPUS) >= 2 else replicate.simulate_devices(2)

keras.utils.set_random_seed(0)
(x_train, y_train), (x_test, y_test) = load_digits()
x_train, x_test = x_train.reshape(-1, 64), x_test.reshape(-1, 64)

# The one copy of the weights is created on the CPU, where towers send their results.
with tf.device("/cpu:0"):
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ],
        name="digits_mlp",
    )
builder = replicate.ReplicaBuilder(model, DEVICES)
x = tf.constant(x_test[:101])  # An odd batch: the towers get 51 and 50 samples.

# One output per tower, in device order.
towers = builder.towers(x)
print(f"tower outputs: {[tuple(t.shape) for t in towers]} on {', '.join(DEVICES)}")
assert [t.shape[0] for t in towers] == [51, 50]

# Merged on the CPU, the towers compute exactly what the single model computes.
merged = builder.call(x)
diff = float(np.abs(merged - model(x)).max())
print(f"builder.call(x) vs model(x): max abs diff {diff:.2e}")
assert merged.shape == (101, 10) and diff <= 1e-6


# Two replicas on the same inputs, their predictions averaged on the CPU.
@tf.function
def averaged(inputs: tf.Tensor) -> tf.Tensor:
    outputs = []
    for i, device in enumerate(DEVICES):
        with tf.device(device), tf.name_scope(f"replica_{i}"):
            outputs.append(model(inputs))
    with tf.device("/cpu:0"):
        return tf.add_n(outputs) / len(outputs)


mean_preds = averaged(x)
# Same weights and same inputs: the average equals either replica's prediction.
avg_diff = float(np.abs(mean_preds - model(x)).max())
print(f"average of {len(DEVICES)} replicas vs model(x): max abs diff {avg_diff:.2e}")
assert avg_diff <= 1e-6
graph = averaged.get_concrete_function(x).graph
placed = sorted({op.device for op in graph.get_operations() if op.type == "MatMul"})
print(f"replica matmuls placed on: {', '.join(placed)}")
assert len(placed) == len(DEVICES)
# The towers' variant: feed the batch twice, so each tower sees all of `x`.
pair = builder.towers(tf.concat([x, x], axis=0))
assert float(np.abs((pair[0] + pair[1]) / 2 - model(x)).max()) <= 1e-6

# Training: each tower computes gradients on its slice; they are averaged on the
# CPU and applied once, to the one set of weights all towers read.
optimizer = tf.compat.v1.train.AdamOptimizer(3e-3)
loss_fn = keras.losses.SparseCategoricalCrossentropy()


@tf.function
def train_step(images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    loss, grads = builder.compute_gradients(loss_fn, images, labels)
    builder.apply_gradients(optimizer, grads)
    return loss


dataset = tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(2048, seed=0).batch(64)
# Shuffled afresh for each of the 8 epochs.
for images, labels in dataset.repeat(8):
    loss = train_step(images, labels)
predicted = np.argmax(builder.call(tf.constant(x_test)), axis=-1)
accuracy = float(np.mean(predicted == y_test))
print(f"final training loss: {float(loss):.4f}")
print(f"test accuracy: {accuracy:.4f}")
assert accuracy >= 0.9, accuracy
# Still one set of weights: two Dense layers, a kernel and a bias each.
print(f"weights in the model: {len(model.weights)}")
assert len(model.weights) == 4
