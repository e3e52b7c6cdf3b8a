"""Model parallelism: parts of one Keras model on different devices via `tf.device`.

Shows, on TensorFlow 2 and Keras 3: a model whose two branches run on two devices
(two GPUs, or two logical CPU devices when there are fewer than two GPUs) and
whose merging head runs on the CPU. Each digit image is cut into its left and
right halves, one half per branch. `build` creates each part's variables under
its device, and the `tf.device` scopes in `call` place the ops of every call,
including those inside the `tf.function` that `fit` traces.

Run: `python examples/model_parallelism.py`
"""

import keras
import tensorflow as tf

import replicate
from replicate.demo import load_digits

# Must run before TensorFlow touches any device.
GPUS = tf.config.list_physical_devices("GPU")
DEVICES = ["/gpu:0", "/gpu:1"] if len(GPUS) >= 2 else replicate.simulate_devices(2)
MERGE_DEVICE = "/cpu:0"


def same_device(placed: str, wanted: str) -> bool:
    """Compares device strings such as '/job:localhost/.../device:CPU:1' and '/cpu:1'."""
    a, b = tf.DeviceSpec.from_string(placed), tf.DeviceSpec.from_string(wanted)
    return (a.device_type.upper(), a.device_index) == (b.device_type.upper(), b.device_index)


class TwoDeviceNet(keras.Model):
    """Left image half on one device, right half on another, merged on the CPU."""

    def __init__(self, devices: list[str], merge_device: str, **kwargs):
        super().__init__(**kwargs)
        self.part_devices = list(devices)
        self.merge_device = merge_device
        self.left = keras.layers.Dense(64, activation="relu", name="left")
        self.right = keras.layers.Dense(64, activation="relu", name="right")
        self.head = keras.layers.Dense(10, activation="softmax", name="head")

    def build(self, input_shape):
        # Keras builds sublayers outside `call`'s device scopes, so each part's
        # variables are created here, on the device that will use them.
        with tf.device(self.part_devices[0]):
            self.left.build((None, 32))
        with tf.device(self.part_devices[1]):
            self.right.build((None, 32))
        with tf.device(self.merge_device):
            self.head.build((None, 128))

    def call(self, images):
        with tf.device(self.part_devices[0]), tf.name_scope("part_0"):
            a = self.left(tf.reshape(images[:, :, :4], [-1, 32]))
        with tf.device(self.part_devices[1]), tf.name_scope("part_1"):
            b = self.right(tf.reshape(images[:, :, 4:], [-1, 32]))
        # Only the two 64-wide activations cross devices, not the weights.
        with tf.device(self.merge_device), tf.name_scope("merge"):
            return self.head(tf.concat([a, b], axis=-1))


keras.utils.set_random_seed(0)
(x_train, y_train), (x_test, y_test) = load_digits()
model = TwoDeviceNet(DEVICES, MERGE_DEVICE, name="two_device_net")
model.build((None, 8, 8, 1))

placement = {model.left: DEVICES[0], model.right: DEVICES[1], model.head: MERGE_DEVICE}
for layer, device in placement.items():
    for variable in layer.weights:
        print(f"variable {variable.path} on {variable.value.device}")
        assert same_device(variable.value.device, device), (variable.path, device)

# The ops of a traced call keep the device each scope asked for.
graph = tf.function(model).get_concrete_function(tf.TensorSpec([None, 8, 8, 1])).graph
wanted = {"part_0": DEVICES[0], "part_1": DEVICES[1], "merge": MERGE_DEVICE}
matmuls = [op for op in graph.get_operations() if op.type == "MatMul"]
for op in matmuls:
    scope = next(part for part in op.name.split("/") if part in wanted)
    print(f"op {op.name} on {op.device}")
    assert same_device(op.device, wanted[scope]), op.name
assert len(matmuls) == 3

# XLA would compile the step as one computation and drop the placement.
model.compile(
    keras.optimizers.Adam(3e-3),
    "sparse_categorical_crossentropy",
    metrics=["accuracy"],
    jit_compile=False,
)
model.fit(x_train, y_train, epochs=8, batch_size=32, verbose=0)
_, accuracy = model.evaluate(x_test, y_test, verbose=0)
print(f"devices: {', '.join(DEVICES)} (merge on {MERGE_DEVICE})")
print(f"test accuracy: {accuracy:.4f}")
assert accuracy >= 0.9, accuracy
