"""TensorFlow scopes around Keras layers, weight sharing, and collecting state updates.

Shows, on TensorFlow 2 and Keras 3:

- `tf.name_scope` and `tf.device` around Keras layer calls: the ops of the traced
  `tf.function` graph carry the scope in their names and the device you asked for;
- weight sharing by calling one layer instance twice: both calls read the very
  same variables, so there is one set of weights;
- collecting what a custom training routine must update: the trainable weights
  (for the optimizer) and the BatchNormalization moving statistics (the
  non-trainable variables that `model.stateless_call` returns updated).

Run: `python examples/scopes_and_sharing.py`
"""

import keras
import numpy as np
import tensorflow as tf

import replicate
from replicate.demo import load_digits

# Real GPUs when there are two; otherwise two logical CPU devices stand in. This
# must run before TensorFlow touches any device.
GPUS = tf.config.list_physical_devices("GPU")
DEVICES = ["/gpu:0", "/gpu:1"] if len(GPUS) >= 2 else replicate.simulate_devices(2)


def same_device(placed: str, wanted: str) -> bool:
    """Compares device strings such as '/device:CPU:1' and '/cpu:1'."""
    a, b = tf.DeviceSpec.from_string(placed), tf.DeviceSpec.from_string(wanted)
    return (a.device_type.upper(), a.device_index) == (b.device_type.upper(), b.device_index)


keras.utils.set_random_seed(0)
shared = keras.layers.Dense(8, activation="relu", name="shared")
head = keras.layers.Dense(3, name="head")
# Built eagerly, so the variables exist before tracing and the graph only reads them.
shared.build((None, 5))
head.build((None, 16))


@tf.function
def two_branches(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    with tf.name_scope("branch_a"), tf.device(DEVICES[0]):
        ha = shared(a)
    with tf.name_scope("branch_b"), tf.device(DEVICES[1]):
        hb = shared(b)  # The same layer instance: the same weights.
    with tf.name_scope("merge"), tf.device("/cpu:0"):
        return head(tf.concat([ha, hb], axis=-1))


spec = tf.TensorSpec([None, 5], tf.float32)
concrete = two_branches.get_concrete_function(spec, spec)
graph = concrete.graph
wanted = {"branch_a": DEVICES[0], "branch_b": DEVICES[1], "merge": "/cpu:0"}
for op in graph.get_operations():
    if op.type == "MatMul":
        print(f"op {op.name} on {op.device}")
        assert same_device(op.device, wanted[op.name.split("/")[0]]), (op.name, op.device)

# Weight sharing: both branches read their weights through the same variable
# handles, and the graph captures one kernel and one bias for the two calls.
reads = {"branch_a": set(), "branch_b": set()}
for op in graph.get_operations():
    scope = op.name.split("/")[0]
    if op.type == "ReadVariableOp" and scope in reads:
        reads[scope].add(op.inputs[0].ref())
same = reads["branch_a"] == reads["branch_b"]
print(f"both branches read the same {len(reads['branch_a'])} variables: {same}")
assert same and len(reads["branch_a"]) == len(shared.weights) == 2
print(f"variables captured by the graph: {len(concrete.variables)}")
assert {id(v) for v in concrete.variables} == {id(v.value) for v in shared.weights + head.weights}

# --- Collecting trainable weights and BatchNormalization updates. ---
(x_train, y_train), _ = load_digits()
images, labels = tf.constant(x_train.reshape(-1, 64)), tf.constant(y_train)
model = keras.Sequential(
    [
        keras.Input((64,)),
        keras.layers.Dense(32),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Dense(10),
    ],
    name="mlp",
)
bn = model.layers[1]
# What the optimizer updates, and what the layers update themselves.
print("trainable:", ", ".join(v.path for v in model.trainable_variables))
print("updated by batchnorm:", ", ".join(v.path for v in model.non_trainable_variables))
assert [id(v) for v in model.non_trainable_variables] == [id(v) for v in bn.non_trainable_variables]
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@tf.function
def train_step(images: tf.Tensor, labels: tf.Tensor, lr: float = 0.5) -> tf.Tensor:
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    with tf.GradientTape() as tape:
        # A pure call: the variables are untouched, the new statistics are returned.
        logits, new_state = model.stateless_call(trainable, non_trainable, images, training=True)
        loss = loss_fn(labels, logits)
    grads = tape.gradient(loss, trainable)
    for variable, grad in zip(model.trainable_variables, grads):
        variable.assign_sub(lr * grad)
    for variable, value in zip(model.non_trainable_variables, new_state):
        variable.assign(value)
    return loss


# The pure call computes the new statistics but writes nothing until told to.
mean_before = bn.moving_mean.numpy()
_, proposed = model.stateless_call(
    [v.value for v in model.trainable_variables],
    [v.value for v in model.non_trainable_variables],
    images,
    training=True,
)
assert np.array_equal(bn.moving_mean, mean_before) and not np.allclose(proposed[0], mean_before)
losses = [float(train_step(images, labels)) for _ in range(30)]
print(f"loss: {losses[0]:.4f} -> {losses[-1]:.4f}")
print(f"moving mean updated by the train step: {not np.allclose(mean_before, bn.moving_mean)}")
assert losses[-1] < 0.5 * losses[0]
assert not np.allclose(mean_before, bn.moving_mean)
