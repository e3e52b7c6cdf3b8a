"""Vision: keras.io's image examples, re-expressed small on synthetic images."""

import keras
import numpy as np
import pytest
from keras import layers, ops

from conformance import harness, synthetic
from conformance.criteria import Trains
from conformance.harness import Data, Example

# -- the MNIST convnet -----------------------------------------------------------------------------


def _digits(count=200, seed=31):
    x = synthetic.images(count, (28, 28, 1), seed)
    x[x < 0.6] = 0.0  # mostly background, as handwritten digits are
    return x, synthetic.learnable_classes(x, 10, seed + 1)


def _mnist_model():
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(8, kernel_size=(3, 3), activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Conv2D(16, kernel_size=(3, 3), activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Flatten(),
            layers.Dropout(0.5),
            layers.Dense(10, activation="softmax"),
        ]
    )


def _mnist_data():
    x, y = _digits()
    return Data(x, keras.utils.to_categorical(y, 10))


MNIST = Example(
    name="mnist_convnet",
    source="examples/vision/mnist_convnet.py",
    family="vision",
    build=_mnist_model,
    compile=lambda m: m.compile("adam", "categorical_crossentropy", metrics=["accuracy"]),
    data=_mnist_data,
    status="tolerance",
    reason="Dropout(0.5) draws per tower",
    batch_size=47,
    epochs=2,
    criterion=Trains(fall=0.05, band=0.03),
)

# -- image classification from scratch: augmentation in the model, separable convs ---------------


def _xception_like_model():
    inputs = keras.Input((32, 32, 3))
    x = layers.RandomFlip("horizontal")(inputs)
    x = layers.RandomRotation(0.1)(x)
    x = layers.Rescaling(1.0 / 255)(x)
    x = layers.Conv2D(8, 3, strides=2, padding="same")(x)
    x = layers.Activation("relu")(layers.BatchNormalization()(x))
    previous = x
    for size in (16, 32):
        x = layers.Activation("relu")(x)
        x = layers.BatchNormalization()(layers.SeparableConv2D(size, 3, padding="same")(x))
        x = layers.Activation("relu")(x)
        x = layers.BatchNormalization()(layers.SeparableConv2D(size, 3, padding="same")(x))
        x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
        # The example's projection is Conv2D(size, 1, strides=2, padding="same"): the same
        # as a 1x1 convolution of every other pixel, written so because TensorFlow 2.21's
        # oneDNN kernel for strided 1x1 convolutions corrupts memory on odd batch sizes
        # (the process aborts on one device, batch 25 or 47, with or without replicate).
        residual = layers.Conv2D(size, 1, padding="same")(previous[:, ::2, ::2, :])
        x = previous = layers.add([x, residual])
    x = layers.BatchNormalization()(layers.SeparableConv2D(48, 3, padding="same")(x))
    x = layers.GlobalAveragePooling2D()(layers.Activation("relu")(x))
    return keras.Model(inputs, layers.Dense(1, activation=None)(layers.Dropout(0.25)(x)))


def _pets_data():
    x = np.floor(synthetic.images(200, (32, 32, 3), 33) * 255)
    return Data(
        x, (x[:, :16].mean(axis=(1, 2, 3)) > x[:, 16:].mean(axis=(1, 2, 3))).astype("int64")
    )


def _compile_pets(model):
    model.compile(
        keras.optimizers.Adam(3e-4),
        keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.BinaryAccuracy(name="acc")],
    )


FROM_SCRATCH = Example(
    name="image_classification_from_scratch",
    alarm=r"BatchNormalization layers .* normalize per tower",
    source="examples/vision/image_classification_from_scratch.py",
    family="vision",
    build=_xception_like_model,
    compile=_compile_pets,
    data=_pets_data,
    status="tolerance",
    reason="random flips, rotations and Dropout draw per tower, and BatchNormalization is "
    "unsynchronized (in 2 epochs at the example's learning rate the loss barely moves, so "
    "the difference is bounded instead)",
    batch_size=47,
    epochs=2,
    weight_tolerance=0.02,
    loss_tolerance=1e-3,
)

# -- a toy ResNet (the functional API guide) -------------------------------------------------


def _resnet_model():
    inputs = keras.Input((32, 32, 3), name="img")
    x = layers.Conv2D(8, 3, activation="relu")(inputs)
    x = layers.Conv2D(16, 3, activation="relu")(x)
    block = layers.MaxPooling2D(3)(x)
    for _ in range(2):
        x = layers.Conv2D(16, 3, activation="relu", padding="same")(block)
        x = layers.Conv2D(16, 3, activation="relu", padding="same")(x)
        block = layers.add([x, block])
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(16, 3, activation="relu")(block))
    x = layers.Dropout(0.5)(layers.Dense(32, activation="relu")(x))
    return keras.Model(inputs, layers.Dense(10)(x))


def _cifar_data():
    x = synthetic.images(200, (32, 32, 3), 34)
    return Data(x, keras.utils.to_categorical(synthetic.learnable_classes(x, 10, 35), 10))


def _compile_resnet(model):
    model.compile(
        keras.optimizers.RMSprop(1e-3),
        keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=["acc"],
    )


RESNET = Example(
    name="toy_resnet",
    source="guides/functional_api.py",
    family="vision",
    build=_resnet_model,
    compile=_compile_resnet,
    data=_cifar_data,
    status="tolerance",
    reason="Dropout(0.5) draws per tower",
    batch_size=47,
    epochs=2,
    criterion=Trains(fall=0.1, band=0.08),
)

# -- MobileNet-style inverted residuals: depthwise convolutions and BatchNorm ----------------------


def _inverted_residual(x, expanded, out, strides=1):
    m = layers.Conv2D(expanded, 1, padding="same", use_bias=False)(x)
    m = keras.activations.swish(layers.BatchNormalization()(m))
    if strides == 2:
        m = layers.ZeroPadding2D(padding=((0, 1), (0, 1)))(m)
    padding = "same" if strides == 1 else "valid"
    m = layers.DepthwiseConv2D(3, strides=strides, padding=padding, use_bias=False)(m)
    m = keras.activations.swish(layers.BatchNormalization()(m))
    m = layers.BatchNormalization()(layers.Conv2D(out, 1, padding="same", use_bias=False)(m))
    if x.shape[-1] == out and strides == 1:
        return layers.Add()([m, x])
    return m


def _mobile_model():
    inputs = keras.Input((16, 16, 3))
    x = layers.Rescaling(1.0 / 255)(inputs)
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation=keras.activations.swish)(x)
    x = _inverted_residual(x, 16, 8)
    x = _inverted_residual(x, 16, 12, strides=2)
    x = _inverted_residual(x, 24, 12)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(5, activation="softmax")(x))


def _flowers_data():
    x = np.floor(synthetic.images(120, (16, 16, 3), 36) * 255)
    return Data(x, keras.utils.to_categorical(synthetic.learnable_classes(x, 5, 37), 5))


def _compile_mobile(model):
    model.compile(
        keras.optimizers.Adam(2e-3),
        keras.losses.CategoricalCrossentropy(label_smoothing=0.1),
        metrics=["accuracy"],
    )


MOBILE = Example(
    name="mobilenet_inverted_residuals",
    alarm=r"BatchNormalization layers .* normalize per tower",
    source="examples/vision/mobilevit.py",
    family="vision",
    build=_mobile_model,
    compile=_compile_mobile,
    data=_flowers_data,
    status="tolerance",
    reason="unsynchronized BatchNormalization normalizes each tower's slice by its own statistics",
    batch_size=47,
    weight_tolerance=0.05,
    loss_tolerance=0.02,
)

# -- captcha OCR: a CTC endpoint layer that adds a per-sample loss --------------------------------

CAPTCHA_CLASSES = 20  # 19 characters and the lookup's out-of-vocabulary index; blank is 20


class CTCLayer(layers.Layer):
    """Adds the CTC loss of each sample, a (batch, 1) tensor, and passes the predictions on."""

    def call(self, labels, predictions):
        batch = ops.shape(labels)[0]
        label_length = ops.full((batch,), ops.shape(labels)[1], "int32")
        output_length = ops.full((batch,), ops.shape(predictions)[1], "int32")
        loss = ops.ctc_loss(
            ops.cast(labels, "int32"),
            ops.log(predictions + keras.backend.epsilon()),
            label_length,
            output_length,
            mask_index=CAPTCHA_CLASSES,
        )
        self.add_loss(ops.expand_dims(loss, 1))
        return predictions


def _captcha_model():
    image = keras.Input((40, 16, 1), name="image", dtype="float32")
    labels = keras.Input((None,), name="label", dtype="float32")
    x = layers.Conv2D(8, 3, activation="relu", kernel_initializer="he_normal", padding="same")(
        image
    )
    x = layers.MaxPooling2D((2, 2))(x)
    x = layers.Conv2D(16, 3, activation="relu", kernel_initializer="he_normal", padding="same")(x)
    x = layers.MaxPooling2D((2, 2))(x)
    x = layers.Reshape((40 // 4, (16 // 4) * 16))(x)
    x = layers.Dense(16, activation="relu")(x)
    x = layers.Bidirectional(layers.LSTM(16, return_sequences=True))(x)
    x = layers.Bidirectional(layers.LSTM(8, return_sequences=True))(x)
    x = layers.Dense(CAPTCHA_CLASSES + 1, activation="softmax", name="dense2")(x)
    return keras.Model([image, labels], CTCLayer(name="ctc_loss")(labels, x))


def _captcha_data():
    generator = synthetic.rng(38)
    images = synthetic.images(120, (40, 16, 1), 39)
    labels = generator.integers(1, CAPTCHA_CLASSES, size=(120, 5)).astype("float32")
    return Data({"image": images, "label": labels})


CAPTCHA = Example(
    name="captcha_ocr_ctc",
    source="examples/vision/captcha_ocr.py",
    family="vision",
    build=_captcha_model,
    compile=lambda model: model.compile(optimizer=keras.optimizers.Adam()),
    data=_captcha_data,
    batch_size=25,
    loss_tolerance=1e-5,
)

# -- a denoising convolutional autoencoder ---------------------------------------------------------


def _autoencoder_model():
    inputs = keras.Input((28, 28, 1))
    x = layers.Conv2D(8, (3, 3), activation="relu", padding="same")(inputs)
    x = layers.MaxPooling2D((2, 2), padding="same")(x)
    x = layers.Conv2D(8, (3, 3), activation="relu", padding="same")(x)
    x = layers.MaxPooling2D((2, 2), padding="same")(x)
    x = layers.Conv2DTranspose(8, (3, 3), strides=2, activation="relu", padding="same")(x)
    x = layers.Conv2DTranspose(8, (3, 3), strides=2, activation="relu", padding="same")(x)
    return keras.Model(inputs, layers.Conv2D(1, (3, 3), activation="sigmoid", padding="same")(x))


def _noisy_digits():
    clean, _ = _digits(count=120, seed=40)
    noise = synthetic.rng(41).normal(0.0, 1.0, size=clean.shape).astype("float32")
    return Data(np.clip(clean + 0.4 * noise, 0.0, 1.0), clean)


AUTOENCODER = Example(
    name="denoising_autoencoder",
    source="examples/vision/autoencoder.py",
    family="vision",
    build=_autoencoder_model,
    compile=lambda model: model.compile(optimizer="adam", loss="binary_crossentropy"),
    data=_noisy_digits,
    batch_size=25,
    loss_tolerance=1e-5,
)

EXAMPLES = [MNIST, FROM_SCRATCH, RESNET, MOBILE, CAPTCHA, AUTOENCODER]


@pytest.mark.parametrize("example, towers", harness.cases(EXAMPLES))
def test_vision(example, towers, runner, record):
    reference, run, measured = runner.measure(example, towers)
    record(measured)
    harness.check(example, reference, run, measured)
