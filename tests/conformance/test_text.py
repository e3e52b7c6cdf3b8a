"""Text: keras.io's NLP examples, re-expressed small on synthetic token ids and one-hot text."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers, ops

from conformance import harness, synthetic
from conformance.criteria import Raises, Trains
from conformance.harness import Data, Example

# -- convnet over token ids ---------------------------------------------------------------------


def _review_data(count=200, length=40, vocabulary=500, seed=21):
    ids = synthetic.tokens(count, length, vocabulary, seed)
    y = (np.mean(ids < vocabulary // 2, axis=1) > 0.5).astype("int64")
    return Data(ids, y)


def _conv_text_model():
    inputs = keras.Input((None,), dtype="int64")
    x = layers.Dropout(0.5)(layers.Embedding(500, 16)(inputs))
    x = layers.Conv1D(16, 7, padding="valid", activation="relu", strides=3)(x)
    x = layers.Conv1D(16, 7, padding="valid", activation="relu", strides=3)(x)
    x = layers.Dense(16, activation="relu")(layers.GlobalMaxPooling1D()(x))
    x = layers.Dropout(0.5)(x)
    return keras.Model(inputs, layers.Dense(1, activation="sigmoid", name="predictions")(x))


def _compile_binary(model):
    model.compile(loss="binary_crossentropy", optimizer="adam", metrics=["accuracy"])


CONV_TEXT = Example(
    name="text_convnet",
    source="examples/nlp/text_classification_from_scratch.py",
    family="text",
    build=_conv_text_model,
    compile=_compile_binary,
    data=_review_data,
    status="tolerance",
    reason="Dropout(0.5) draws per tower",
    batch_size=47,
    epochs=2,
    criterion=Trains(fall=0.005, band=0.01),
)

# -- transformer block -----------------------------------------------------------------------------


class TokenAndPosition(layers.Layer):
    """A token embedding plus a learned embedding of each position."""

    def __init__(self, length, vocabulary, width):
        super().__init__()
        self.token = layers.Embedding(vocabulary, width)
        self.position = layers.Embedding(length, width)

    def call(self, x):
        return self.token(x) + self.position(ops.arange(ops.shape(x)[-1]))


class TransformerBlock(layers.Layer):
    """Self-attention and a feed-forward net, each with dropout, a residual and LayerNorm."""

    def __init__(self, width, heads, hidden, rate=0.1):
        super().__init__()
        self.attention = layers.MultiHeadAttention(num_heads=heads, key_dim=width)
        self.ffn = keras.Sequential([layers.Dense(hidden, activation="relu"), layers.Dense(width)])
        self.norm1 = layers.LayerNormalization(epsilon=1e-6)
        self.norm2 = layers.LayerNormalization(epsilon=1e-6)
        self.drop1, self.drop2 = layers.Dropout(rate), layers.Dropout(rate)

    def call(self, x, training=False):
        x = self.norm1(x + self.drop1(self.attention(x, x), training=training))
        return self.norm2(x + self.drop2(self.ffn(x), training=training))


def _transformer_model():
    inputs = keras.Input((24,))
    x = TransformerBlock(16, 2, 16)(TokenAndPosition(24, 500, 16)(inputs))
    x = layers.Dropout(0.1)(layers.GlobalAveragePooling1D()(x))
    x = layers.Dropout(0.1)(layers.Dense(20, activation="relu")(x))
    return keras.Model(inputs, layers.Dense(2, activation="softmax")(x))


def _compile_sparse_softmax(model):
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])


TRANSFORMER = Example(
    name="transformer_classifier",
    source="examples/nlp/text_classification_with_transformer.py",
    family="text",
    build=_transformer_model,
    compile=_compile_sparse_softmax,
    data=lambda: _review_data(length=24, seed=22),
    status="tolerance",
    reason="Dropout(0.1) draws per tower",
    batch_size=47,
    epochs=2,
    criterion=Trains(fall=0.05, band=0.08),
)

# -- bidirectional LSTMs ---------------------------------------------------------------------------


def _bilstm_model():
    inputs = keras.Input((None,), dtype="int32")
    x = layers.Embedding(500, 8)(inputs)
    x = layers.Bidirectional(layers.LSTM(8, return_sequences=True))(x)
    x = layers.Bidirectional(layers.LSTM(8))(x)
    return keras.Model(inputs, layers.Dense(1, activation="sigmoid")(x))


BILSTM = Example(
    name="bidirectional_lstm",
    source="examples/nlp/bidirectional_lstm_imdb.py",
    family="text",
    build=_bilstm_model,
    compile=_compile_binary,
    data=lambda: _review_data(count=120, length=16, seed=23),
    batch_size=25,
    loss_tolerance=1e-5,
)

# -- masking: Embedding(mask_zero=True), a masked per-token loss -----------------------------------


def _masked_data():
    ids = synthetic.tokens(200, 20, 200, seed=24, pad=True)
    tags = (ids % 3).astype("int64")  # one tag per token; padding (0) is masked out
    return Data(ids.astype("int32"), tags)


def _masked_model():
    inputs = keras.Input((None,), dtype="int32")
    x = layers.Embedding(input_dim=200, output_dim=16, mask_zero=True)(inputs)
    x = layers.LSTM(8, return_sequences=True)(x)
    return keras.Model(inputs, layers.Dense(3)(x))


def _compile_masked(model):
    model.compile(
        "adam",
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


MASKING = Example(
    name="masking_mask_zero",
    source="guides/understanding_masking_and_padding.py",
    family="text",
    build=_masked_model,
    compile=_compile_masked,
    data=_masked_data,
    batch_size=47,
    loss_tolerance=1e-5,
)

# -- Switch Transformer: a batch size written into the layer ---------------------------------------

SWITCH_BATCH, SWITCH_TOKENS, SWITCH_WIDTH, SWITCH_EXPERTS = 25, 8, 8, 2


class Router(layers.Layer):
    """Top-1 routing with noise in training, a load-balancing loss and a capacity per expert."""

    def __init__(self, experts, capacity):
        super().__init__()
        self.experts, self.capacity = experts, capacity
        self.route = layers.Dense(experts)
        self.seed = keras.random.SeedGenerator(5)

    def call(self, x, training=False):
        logits = self.route(x)
        if training:
            logits += keras.random.uniform(ops.shape(logits), 0.9, 1.1, seed=self.seed)
        probs = ops.softmax(logits, axis=-1)
        gate, index = ops.top_k(probs, k=1)
        mask = ops.one_hot(index, self.experts)[:, 0, :]
        balance = ops.mean(ops.mean(mask, axis=0) * ops.mean(probs, axis=0)) * self.experts**2
        self.add_loss(balance)
        position = ops.cast(ops.cumsum(mask, axis=0) * mask, "int32")
        mask = mask * ops.cast(position < self.capacity, "float32")
        kept = ops.sum(mask, axis=-1)
        gate = gate[:, 0] * kept
        slot = ops.one_hot(ops.sum(position, axis=-1), self.capacity)
        combine = (gate[:, None] * mask)[:, :, None] * slot[:, None, :]
        return combine, combine


class Switch(layers.Layer):
    """The mixture-of-experts FFN; it reshapes to the tokens of `SWITCH_BATCH` samples."""

    def __init__(self):
        super().__init__()
        tokens = SWITCH_BATCH * SWITCH_TOKENS
        self.capacity = tokens // SWITCH_EXPERTS
        self.experts = [
            keras.Sequential([layers.Dense(SWITCH_WIDTH, activation="relu"), layers.Dense(8)])
            for _ in range(SWITCH_EXPERTS)
        ]
        self.router = Router(SWITCH_EXPERTS, self.capacity)

    def call(self, x):
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        flat = ops.reshape(x, (SWITCH_BATCH * SWITCH_TOKENS, SWITCH_WIDTH))  # as the example
        dispatch, combine = self.router(flat)
        routed = ops.einsum("ab,acd->cdb", flat, dispatch)
        routed = ops.reshape(routed, (SWITCH_EXPERTS, self.capacity, SWITCH_WIDTH))
        outputs = ops.stack([e(routed[i]) for i, e in enumerate(self.experts)], axis=1)
        merged = ops.einsum("abc,xba->xc", outputs, combine)
        return ops.reshape(merged, (batch, length, SWITCH_WIDTH))


class SwitchBlock(TransformerBlock):
    def __init__(self):
        super().__init__(SWITCH_WIDTH, 2, SWITCH_WIDTH, rate=0.25)
        self.ffn = Switch()


def _switch_model():
    inputs = keras.Input((SWITCH_TOKENS,))
    x = TokenAndPosition(SWITCH_TOKENS, 200, SWITCH_WIDTH)(inputs)
    x = layers.GlobalAveragePooling1D()(SwitchBlock()(x))
    x = layers.Dense(SWITCH_WIDTH, activation="relu")(layers.Dropout(0.25)(x))
    return keras.Model(inputs, layers.Dense(2, activation="softmax")(layers.Dropout(0.25)(x)))


SWITCH = Example(
    name="switch_transformer",
    alarm=r"a tower's slice failed: the model seems to assume a fixed batch size",
    source="examples/nlp/text_classification_with_switch_transformer.py",
    family="text",
    build=_switch_model,
    compile=_compile_sparse_softmax,
    data=lambda: _review_data(count=4 * SWITCH_BATCH, length=SWITCH_TOKENS, vocabulary=200),
    status="limit",
    reason="the Switch layer reshapes to a batch size written into it (25 samples); a tower "
    "holds a slice, so the reshape fails",
    batch_size=SWITCH_BATCH,
    criterion=Raises(
        Exception,
        r"raised in tower 0 of \d \(device /cpu:0\), which ran the model "
        r"on \d+ of the global batch of 25 samples",
    ),
)

# -- addition as sequence-to-sequence (bool one-hot) --------------------------------------------

CHARS = "0123456789+ "


def _addition_data(count=200, digits=3, seed=25):
    generator = synthetic.rng(seed)
    length = 2 * digits + 1
    x = np.zeros((count, length, len(CHARS)), dtype=bool)
    y = np.zeros((count, digits + 1, len(CHARS)), dtype=bool)
    for i in range(count):
        a, b = (int(v) for v in generator.integers(0, 10**digits, size=2))
        question = f"{a}+{b}".ljust(length)[::-1]  # the example reverses the question
        answer = str(a + b).ljust(digits + 1)
        for t, char in enumerate(question):
            x[i, t, CHARS.index(char)] = True
        for t, char in enumerate(answer):
            y[i, t, CHARS.index(char)] = True
    return Data(x, y)


def _addition_model():
    return keras.Sequential(
        [
            keras.Input((7, len(CHARS))),
            layers.LSTM(16),
            layers.RepeatVector(4),
            layers.LSTM(16, return_sequences=True),
            layers.Dense(len(CHARS), activation="softmax"),
        ]
    )


def _compile_categorical(model):
    model.compile(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])


ADDITION = Example(
    name="addition_rnn",
    source="examples/nlp/addition_rnn.py",
    family="text",
    build=_addition_model,
    compile=_compile_categorical,
    data=_addition_data,
    batch_size=47,
    loss_tolerance=1e-5,
)

# -- character-level seq2seq: two inputs, encoder states as the decoder's start ------------------


def _seq2seq_data():
    """One-hot characters; as in the example, sequences are padded with the space (id 0)."""
    generator = synthetic.rng(26)

    def padded(count, length, vocabulary):
        ids = generator.integers(1, vocabulary, size=(count, length))
        ids[np.arange(length)[None, :] >= generator.integers(3, length, count)[:, None]] = 0
        return ids

    source = np.eye(12, dtype="float32")[padded(200, 8, 12)]
    target_ids = padded(200, 11, 14)
    decoder_inputs = np.eye(14, dtype="float32")[target_ids[:, :-1]]
    return Data([source, decoder_inputs], np.eye(14, dtype="float32")[target_ids[:, 1:]])


def _seq2seq_model():
    encoder_inputs = keras.Input((None, 12))
    _, h, c = layers.LSTM(16, return_state=True)(encoder_inputs)
    decoder_inputs = keras.Input((None, 14))
    decoded = layers.LSTM(16, return_sequences=True)(decoder_inputs, initial_state=[h, c])
    outputs = layers.Dense(14, activation="softmax")(decoded)
    return keras.Model([encoder_inputs, decoder_inputs], outputs)


def _compile_seq2seq(model):
    model.compile(optimizer="rmsprop", loss="categorical_crossentropy", metrics=["accuracy"])


SEQ2SEQ = Example(
    name="lstm_seq2seq",
    source="examples/nlp/lstm_seq2seq.py",
    family="text",
    build=_seq2seq_model,
    compile=_compile_seq2seq,
    data=_seq2seq_data,
    batch_size=47,
    loss_tolerance=1e-5,
)

# -- multi-label tf-idf: dense, then the same rows as a SparseTensor -------------------------------


def _tfidf_rows(seed=27):
    generator = synthetic.rng(seed)
    present = generator.random((200, 300)) < 0.05
    tfidf = (present * generator.random((200, 300)) * 3).astype("float32")
    labels = (tfidf @ generator.normal(size=(300, 10)) > 0.5).astype("float32")
    return tfidf, labels


def _tfidf_model(sparse=False):
    inputs = keras.Input((300,), sparse=sparse)
    x = layers.Dense(16, activation="relu")(layers.Dense(32, activation="relu")(inputs))
    return keras.Model(inputs, layers.Dense(10, activation="sigmoid")(x))


def _compile_multilabel(model):
    model.compile(loss="binary_crossentropy", optimizer="adam", metrics=["binary_accuracy"])


MULTI_LABEL = Example(
    name="multi_label_tfidf",
    source="examples/nlp/multi_label_classification.py",
    family="text",
    build=_tfidf_model,
    compile=_compile_multilabel,
    data=lambda: Data(*_tfidf_rows()),
    batch_size=47,
    loss_tolerance=1e-5,
)


def _sparse_data():
    tfidf, labels = _tfidf_rows()
    return Data(tf.sparse.from_dense(tfidf), labels)


SPARSE = Example(
    name="multi_label_sparse",
    source="examples/nlp/multi_label_classification.py",
    family="text",
    build=lambda: _tfidf_model(sparse=True),
    compile=_compile_multilabel,
    data=_sparse_data,
    batch_size=47,
    status="tolerance",
    alarm=r"the sparse gradients of `dense(_\d+)?/kernel` have other rows through the towers "
    r"than on one device",
    reason="Keras multiplies a sparse batch by the kernel through a lookup of the batch's "
    "unique feature ids, so the kernel's gradient has one row per id in the batch on one "
    "device and one per id per tower through the towers; their sums agree (with SGD the "
    "weights end 3e-8 apart), but Adam squares each row before adding them (the check names "
    "it)",
    weight_tolerance=1e-2,
    loss_tolerance=1e-2,  # binary accuracy moves in steps of 1/2000: 0.4% measured
)

# -- ragged token ids: a bag of embeddings -------------------------------------------------------


class MeanOverTokens(layers.Layer):
    """The mean embedding of each sample's tokens, however many it has."""

    def call(self, x):
        return tf.reduce_mean(x, axis=1)


def _ragged_data():
    generator = synthetic.rng(28)
    rows = [generator.integers(1, 200, size=int(n)) for n in generator.integers(3, 20, 200)]
    y = np.array([float(np.mean(r < 100) > 0.5) for r in rows], dtype="float32")
    return Data(tf.ragged.constant(rows, dtype=tf.int64), y)


def _ragged_model():
    inputs = keras.Input((None,), dtype="int64", ragged=True)
    x = MeanOverTokens()(layers.Embedding(200, 8)(inputs))
    return keras.Model(inputs, layers.Dense(1)(x))


def _compile_logits(model):
    model.compile("adam", keras.losses.BinaryCrossentropy(from_logits=True), metrics=["accuracy"])


RAGGED = Example(
    name="ragged_bag_of_tokens",
    source="examples/nlp/text_classification_from_scratch.py",
    family="text",
    build=_ragged_model,
    compile=_compile_logits,
    data=_ragged_data,
    batch_size=47,
    loss_tolerance=1e-5,
)

EXAMPLES = [
    CONV_TEXT,
    TRANSFORMER,
    BILSTM,
    MASKING,
    SWITCH,
    ADDITION,
    SEQ2SEQ,
    MULTI_LABEL,
    SPARSE,
    RAGGED,
]


@pytest.mark.parametrize("example, towers", harness.cases(EXAMPLES))
def test_text(example, towers, runner, record):
    reference, run, measured = runner.measure(example, towers)
    record(measured)
    harness.check(example, reference, run, measured)
