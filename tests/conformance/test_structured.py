"""Structured data: keras.io's tabular examples, re-expressed small on synthetic rows."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers, ops

from conformance import harness, synthetic
from conformance.criteria import Differs, Trains
from conformance.harness import Data, Example

# -- heart disease, preprocessing layers inside the model ---------------------------------------

HEART_NUMERIC = ("age", "trestbps", "chol", "thalach", "oldpeak", "slope")
HEART_CATEGORIES = {"sex": 2, "cp": 4, "fbs": 2, "restecg": 3, "exang": 2, "ca": 4, "thal": 3}


def _heart_rows(count=200, seed=11):
    """Raw rows as the heart-disease CSV gives them: floats, small integers and one string."""
    generator = synthetic.rng(seed)
    rows = {
        name: generator.normal(50, 10, size=(count, 1)).astype("float32") for name in HEART_NUMERIC
    }
    for name, size in HEART_CATEGORIES.items():
        rows[name] = generator.integers(0, size, size=count)
    rows["thal"] = np.array(["fixed", "normal", "reversible"])[rows["thal"]]
    target = ((rows["age"][:, 0] > 50) ^ (rows["cp"] == 0)).astype("int64")
    return rows, target


@functools.cache  # the model's Normalization layers adapt to it at every build
def _heart_data():
    rows, target = _heart_rows()
    x = {name: rows[name] for name in HEART_NUMERIC}
    # The example one-hot encodes categoricals in its tf.data pipeline (int64 multi-hot).
    for name, size in HEART_CATEGORIES.items():
        codes = rows[name] if name != "thal" else np.unique(rows[name], return_inverse=True)[1]
        x[name] = np.eye(size, dtype="int64")[codes]
    return Data(x, target)


def _heart_model():
    x = _heart_data().x
    inputs, encoded = {}, []
    for name in HEART_NUMERIC:
        inputs[name] = keras.Input((1,), name=name, dtype="float32")
        normalizer = layers.Normalization()
        normalizer.adapt(x[name])
        encoded.append(normalizer(inputs[name]))
    for name, size in HEART_CATEGORIES.items():
        inputs[name] = keras.Input((size,), name=name, dtype="int64")
        encoded.append(ops.cast(inputs[name], "float32"))
    hidden = layers.Dense(32, activation="relu")(layers.concatenate(encoded))
    hidden = layers.Dropout(0.5)(hidden)
    return keras.Model(inputs, layers.Dense(1, activation="sigmoid")(hidden))


def _compile_adam_binary(model):
    model.compile("adam", "binary_crossentropy", metrics=["accuracy"])


HEART = Example(
    name="heart_from_scratch",
    source="examples/structured_data/structured_data_classification_from_scratch.py",
    family="structured",
    build=_heart_model,
    compile=_compile_adam_binary,
    data=_heart_data,
    status="tolerance",
    reason="Dropout(0.5) draws per tower",
    batch_size=47,
    epochs=2,
    criterion=Trains(fall=0.02, band=0.02),
)

# -- wide & deep on covertype: string lookups, embeddings, BatchNorm ------------------------------

COVER_NUMERIC = 10
COVER_STRINGS = {"Wilderness_Area": 4, "Soil_Type": 40}


def _cover_data():
    generator = synthetic.rng(12)
    count = 200
    x = {f"n{i}": generator.normal(size=count).astype("float32") for i in range(COVER_NUMERIC)}
    for name, size in COVER_STRINGS.items():
        x[name] = tf.constant([f"{name}{i}" for i in generator.integers(0, size, size=count)])
    y = synthetic.learnable_classes(np.stack([x[f"n{i}"] for i in range(COVER_NUMERIC)], 1), 7, 13)
    return Data(x, y)


def _cover_model():
    inputs = {f"n{i}": keras.Input((), name=f"n{i}", dtype="float32") for i in range(COVER_NUMERIC)}
    inputs.update({name: keras.Input((), name=name, dtype="string") for name in COVER_STRINGS})

    def encode(embed):
        parts = []
        for name, value in inputs.items():
            if name in COVER_STRINGS:
                size = COVER_STRINGS[name]
                vocabulary = [f"{name}{i}" for i in range(size)]
                if embed:
                    lookup = layers.StringLookup(vocabulary=vocabulary, num_oov_indices=0)
                    parts.append(layers.Embedding(size, int(size**0.5))(lookup(value)))
                else:
                    lookup = layers.StringLookup(
                        vocabulary=vocabulary, num_oov_indices=0, output_mode="one_hot"
                    )
                    parts.append(ops.cast(lookup(value), "float32"))
            else:
                parts.append(ops.expand_dims(value, -1))
        return layers.concatenate(parts)

    wide = layers.BatchNormalization()(encode(embed=False))
    deep = encode(embed=True)
    for units in (16, 16):
        deep = layers.Dense(units)(deep)
        deep = layers.BatchNormalization()(deep)
        deep = layers.ReLU()(deep)
        deep = layers.Dropout(0.1)(deep)
    merged = layers.concatenate([wide, deep])
    return keras.Model(inputs, layers.Dense(7, activation="softmax")(merged))


def _compile_cover(model):
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )


WIDE_DEEP = Example(
    name="wide_and_deep",
    alarm=r"BatchNormalization layers .* normalize per tower",
    source="examples/structured_data/wide_deep_cross_networks.py",
    family="structured",
    build=_cover_model,
    compile=_compile_cover,
    data=_cover_data,
    status="tolerance",
    reason="unsynchronized BatchNormalization (per-tower statistics) and Dropout(0.1) draws",
    batch_size=47,
    epochs=2,
    criterion=Trains(fall=0.02, band=0.02),
)

# -- FeatureSpace: preprocessing outside the model, crosses and hashing ----------------------------


@functools.cache  # adapting the FeatureSpace takes seconds; every build reads its width
def _feature_space_data():
    rows, target = _heart_rows(seed=14)
    raw = {name: rows[name][:, 0] for name in HEART_NUMERIC}
    raw.update({name: rows[name] for name in HEART_CATEGORIES})
    fs = keras.utils.FeatureSpace
    space = fs(
        features={
            **{n: fs.integer_categorical() for n in HEART_CATEGORIES if n != "thal"},
            "thal": fs.string_categorical(),
            "age": fs.float_discretized(num_bins=10),
            **{n: fs.float_normalized() for n in HEART_NUMERIC if n != "age"},
        },
        crosses=[fs.cross(("sex", "age"), crossing_dim=16), fs.cross(("thal", "ca"), 8)],
        output_mode="concat",
    )
    space.adapt(tf.data.Dataset.from_tensor_slices(raw).batch(64))
    encoded = np.asarray(space(raw), dtype="float32")
    return Data(encoded, target)


def _feature_space_model():
    width = _feature_space_data().x.shape[1]
    inputs = keras.Input((width,))
    hidden = layers.Dropout(0.5)(layers.Dense(32, activation="relu")(inputs))
    return keras.Model(inputs, layers.Dense(1, activation="sigmoid")(hidden))


FEATURE_SPACE = Example(
    name="feature_space",
    source="examples/structured_data/structured_data_classification_with_feature_space.py",
    family="structured",
    build=_feature_space_model,
    compile=_compile_adam_binary,
    data=_feature_space_data,
    status="tolerance",
    reason="Dropout(0.5) draws per tower",
    batch_size=47,
    epochs=2,
    criterion=Trains(fall=0.02, band=0.02),
)

# -- imbalanced classification with class weights --------------------------------------------------


def _fraud_data():
    generator = synthetic.rng(15)
    x = generator.normal(size=(200, 30)).astype("float32")
    y = (x[:, 0] + 0.5 * x[:, 1] > 1.6).astype("int64")  # about 8% positive
    counts = np.bincount(y, minlength=2)
    return Data(x, y, class_weight={0: 1.0 / counts[0], 1: 1.0 / counts[1]})


def _fraud_model():
    return keras.Sequential(
        [
            keras.Input((30,)),
            layers.Dense(32, activation="relu"),
            layers.Dense(32, activation="relu"),
            layers.Dropout(0.3),
            layers.Dense(32, activation="relu"),
            layers.Dropout(0.3),
            layers.Dense(1, activation="sigmoid"),
        ]
    )


def _compile_fraud(model):
    model.compile(
        keras.optimizers.Adam(1e-2),
        "binary_crossentropy",
        metrics=[
            keras.metrics.FalseNegatives(name="fn"),
            keras.metrics.FalsePositives(name="fp"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
        ],
    )


IMBALANCED = Example(
    name="imbalanced_class_weight",
    source="examples/structured_data/imbalanced_classification.py",
    family="structured",
    build=_fraud_model,
    compile=_compile_fraud,
    data=_fraud_data,
    status="tolerance",
    reason="Dropout(0.3) draws per tower",
    batch_size=47,
    epochs=2,
    criterion=Trains(fall=0.2, band=0.1),
)

# -- collaborative filtering: a dot product over the whole batch -----------------------------------


class RecommenderNet(keras.Model):
    """Users and movies embedded; `ops.tensordot(..., 2)` sums over the batch axis too."""

    def __init__(self, users, movies, size):
        super().__init__()
        regularizer = keras.regularizers.l2(1e-6)
        self.user_embedding = layers.Embedding(
            users, size, embeddings_initializer="he_normal", embeddings_regularizer=regularizer
        )
        self.user_bias = layers.Embedding(users, 1)
        self.movie_embedding = layers.Embedding(
            movies, size, embeddings_initializer="he_normal", embeddings_regularizer=regularizer
        )
        self.movie_bias = layers.Embedding(movies, 1)

    def call(self, inputs):
        users, movies = inputs[:, 0], inputs[:, 1]
        score = ops.tensordot(self.user_embedding(users), self.movie_embedding(movies), 2)
        return ops.sigmoid(score + self.user_bias(users) + self.movie_bias(movies))


def _ratings_data():
    generator = synthetic.rng(16)
    x = np.stack([generator.integers(0, 30, 200), generator.integers(0, 50, 200)], 1)
    return Data(x.astype("int64"), generator.random(200).astype("float32"))


def _recommender():
    model = RecommenderNet(30, 50, 8)
    model(np.zeros((1, 2), "int64"))  # replicate() takes built models (the README's rule)
    return model


def _compile_recommender(model):
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.BinaryCrossentropy())


COLLABORATIVE = Example(
    name="collaborative_filtering",
    alarm=r"the forward pass mixes samples across the batch",
    source="examples/structured_data/collaborative_filtering_movielens.py",
    family="structured",
    build=_recommender,
    compile=_compile_recommender,
    data=_ratings_data,
    status="limit",
    reason="the forward pass mixes samples: `tensordot(u, m, 2)` sums over the whole batch, "
    "so each tower sums over its slice only",
    batch_size=47,
    criterion=Differs(at_least=1e-3),
)

EXAMPLES = [HEART, WIDE_DEEP, FEATURE_SPACE, IMBALANCED, COLLABORATIVE]


@pytest.mark.parametrize("example, towers", harness.cases(EXAMPLES))
def test_structured(example, towers, runner, record):
    reference, run, measured = runner.measure(example, towers)
    record(measured)
    harness.check(example, reference, run, measured)
