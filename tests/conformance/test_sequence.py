"""Sequences and time series: keras.io's examples, re-expressed small on synthetic series."""

import keras
import numpy as np
import pytest
from keras import layers

from conformance import harness, synthetic
from conformance.criteria import Trains
from conformance.harness import Data, Example


def _series(count, steps, channels, seed):
    """Float32 random walks, shape (count, steps, channels)."""
    walk = synthetic.rng(seed).normal(size=(count, steps, channels)).cumsum(axis=1)
    return (walk / np.sqrt(steps)).astype("float32")


# -- time series classification: a fully convolutional net with BatchNorm ------------------------


def _ford_data():
    x = _series(200, 64, 1, seed=51)
    return Data(x, (x[:, -1, 0] > x[:, 0, 0]).astype("int64"))


def _fcn_model():
    inputs = keras.Input((64, 1))
    x = inputs
    for _ in range(3):
        x = layers.Conv1D(filters=8, kernel_size=3, padding="same")(x)
        x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, layers.Dense(2, activation="softmax")(x))


def _compile_fcn(model):
    model.compile(
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        metrics=["sparse_categorical_accuracy"],
    )


FCN = Example(
    name="timeseries_fcn",
    alarm=r"BatchNormalization layers .* normalize per tower",
    source="examples/timeseries/timeseries_classification_from_scratch.py",
    family="sequence",
    build=_fcn_model,
    compile=_compile_fcn,
    data=_ford_data,
    status="tolerance",
    reason="unsynchronized BatchNormalization normalizes each tower's slice by its own "
    "statistics (evaluate's accuracy can flip a sample: 0.5%)",
    batch_size=47,
    weight_tolerance=0.02,
    loss_tolerance=0.03,
)

# -- weather forecasting: one LSTM and a regression head ---------------------------------------


def _weather_data():
    x = _series(200, 24, 7, seed=52)
    return Data(x, x[:, -1, 1:2] * 0.5 + 0.1)


def _forecast_model():
    inputs = keras.Input((24, 7))
    return keras.Model(inputs, layers.Dense(1)(layers.LSTM(8)(inputs)))


WEATHER = Example(
    name="weather_lstm_forecast",
    source="examples/timeseries/timeseries_weather_forecasting.py",
    family="sequence",
    build=_forecast_model,
    compile=lambda model: model.compile(keras.optimizers.Adam(1e-3), loss="mse"),
    data=_weather_data,
    batch_size=47,
    loss_tolerance=1e-5,
)

# -- a transformer encoder over time steps ------------------------------------------------------


def _encoder_block(inputs, head_size, heads, hidden, dropout):
    x = layers.MultiHeadAttention(key_dim=head_size, num_heads=heads, dropout=dropout)(
        inputs, inputs
    )
    x = layers.LayerNormalization(epsilon=1e-6)(layers.Dropout(dropout)(x))
    residual = x + inputs
    x = layers.Conv1D(filters=hidden, kernel_size=1, activation="relu")(residual)
    x = layers.Conv1D(filters=inputs.shape[-1], kernel_size=1)(layers.Dropout(dropout)(x))
    return layers.LayerNormalization(epsilon=1e-6)(x) + residual


def _ts_transformer_model():
    inputs = keras.Input((64, 1))
    x = _encoder_block(inputs, head_size=8, heads=2, hidden=4, dropout=0.25)
    x = layers.GlobalAveragePooling1D(data_format="channels_last")(x)
    x = layers.Dropout(0.4)(layers.Dense(16, activation="relu")(x))
    return keras.Model(inputs, layers.Dense(2, activation="softmax")(x))


def _compile_ts_transformer(model):
    model.compile(
        loss="sparse_categorical_crossentropy",
        optimizer=keras.optimizers.Adam(learning_rate=1e-3),
        metrics=["sparse_categorical_accuracy"],
    )


TS_TRANSFORMER = Example(
    name="timeseries_transformer",
    source="examples/timeseries/timeseries_classification_transformer.py",
    family="sequence",
    build=_ts_transformer_model,
    compile=_compile_ts_transformer,
    data=_ford_data,
    status="tolerance",
    reason="the attention's and the Dropout layers' draws differ per tower",
    batch_size=47,
    epochs=2,
    criterion=Trains(fall=0.02, band=0.02),
)

# -- a stateful LSTM: state carried from one batch to the next ---------------------------------

STATEFUL_BATCH = 25


def _stateful_model():
    return keras.Sequential(
        [
            keras.Input(batch_shape=(STATEFUL_BATCH, 10, 4)),
            layers.LSTM(8, stateful=True),
            layers.Dense(1),
        ]
    )


def _paragraphs():
    x = _series(4 * STATEFUL_BATCH, 10, 4, seed=53)
    return Data(x, x[:, -1, :1])


STATEFUL = Example(
    name="stateful_lstm",
    source="guides/working_with_rnns.py",
    family="sequence",
    build=_stateful_model,
    compile=lambda model: model.compile("adam", "mse"),
    data=_paragraphs,
    batch_size=STATEFUL_BATCH,
    loss_tolerance=1e-5,
)

# -- anomaly detection: a convolutional autoencoder of a series -------------------------------


def _anomaly_model():
    return keras.Sequential(
        [
            keras.Input((48, 1)),
            layers.Conv1D(16, 7, padding="same", strides=2, activation="relu"),
            layers.Dropout(rate=0.2),
            layers.Conv1D(8, 7, padding="same", strides=2, activation="relu"),
            layers.Conv1DTranspose(8, 7, padding="same", strides=2, activation="relu"),
            layers.Dropout(rate=0.2),
            layers.Conv1DTranspose(16, 7, padding="same", strides=2, activation="relu"),
            layers.Conv1DTranspose(1, 7, padding="same"),
        ]
    )


def _daily_values():
    x = _series(200, 48, 1, seed=54)
    return Data(x, x)


ANOMALY = Example(
    name="timeseries_anomaly_autoencoder",
    source="examples/timeseries/timeseries_anomaly_detection.py",
    family="sequence",
    build=_anomaly_model,
    compile=lambda model: model.compile(keras.optimizers.Adam(learning_rate=1e-3), "mse"),
    data=_daily_values,
    status="tolerance",
    reason="Dropout(0.2) draws per tower",
    batch_size=47,
    epochs=2,
    criterion=Trains(fall=0.05, band=0.02),
)

EXAMPLES = [FCN, WEATHER, TS_TRANSFORMER, STATEFUL, ANOMALY]


@pytest.mark.parametrize("example, towers", harness.cases(EXAMPLES))
def test_sequence(example, towers, runner, record):
    reference, run, measured = runner.measure(example, towers)
    record(measured)
    harness.check(example, reference, run, measured)
