"""Native TensorFlow optimizers usable wherever Keras accepts an optimizer.

`NativeOptimizer` updates weights with the fused TensorFlow kernels that the
`tf.compat.v1.train` optimizers run (`ResourceApplyAdam`, ...), with their
hyperparameter conventions, while its slots are Keras variables: so it goes
into `compile(optimizer=...)`, Keras callbacks can change its learning rate,
and its state is saved and restored with the model's checkpoints.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from replicate import _keras_compat

KINDS = ("sgd", "momentum", "adam", "rmsprop", "adagrad")

# Keras-like defaults per kind (the names Keras' own optimizers use).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"learning_rate": 0.01},
    "momentum": {"learning_rate": 0.01, "momentum": 0.9, "nesterov": False},
    "adam": {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7},
    "rmsprop": {
        "learning_rate": 0.001,
        "rho": 0.9,
        "momentum": 0.0,
        "epsilon": 1e-7,
        "centered": False,
    },
    "adagrad": {"learning_rate": 0.001, "initial_accumulator_value": 0.1},
}


def _from_tf_optimizer(optimizer: tf.compat.v1.train.Optimizer) -> tuple[str, dict[str, Any]]:
    """The kind and hyperparameters of a `tf.compat.v1.train` optimizer."""
    v1 = tf.compat.v1.train
    # Exact classes first: MomentumOptimizer is not a subclass of the others.
    for cls, kind in (
        (v1.AdamOptimizer, "adam"),
        (v1.MomentumOptimizer, "momentum"),
        (v1.RMSPropOptimizer, "rmsprop"),
        (v1.AdagradOptimizer, "adagrad"),
        (v1.GradientDescentOptimizer, "sgd"),
    ):
        if isinstance(optimizer, cls):
            return kind, _keras_compat.native_hyperparameters(optimizer, cls.__name__)
    raise TypeError(
        "NativeOptimizer wraps GradientDescentOptimizer, MomentumOptimizer, AdamOptimizer, "
        "RMSPropOptimizer or AdagradOptimizer from tf.compat.v1.train. Received: "
        f"{type(optimizer).__name__}"
    )


def _handle(variable: Any) -> Any:
    """The resource handle of a Keras variable (or of the tf.Variable inside it)."""
    return variable.handle if isinstance(variable, tf.Variable) else variable.value.handle


@keras.saving.register_keras_serializable(package="replicate")
class NativeOptimizer(keras.optimizers.Optimizer):
    """A native TensorFlow optimizer that Keras accepts as one of its own.

    Args:
        optimizer: A `tf.compat.v1.train` optimizer instance (its
            hyperparameters are taken over), or one of `"sgd"`,
            `"momentum"`, `"adam"`, `"rmsprop"`, `"adagrad"`.
        **hyperparameters: With a name, Keras-style arguments:
            `learning_rate`, `momentum`, `nesterov`, `beta_1`, `beta_2`,
            `epsilon`, `rho`, `centered`, `initial_accumulator_value`, and
            Keras' `name`. Defaults follow Keras' optimizers.

    Conventions of the native kernels that differ from Keras' optimizers:
        - RMSProp starts its mean square at 1 (Keras: 0) and adds `epsilon`
          inside the square root (Keras: outside).
        - Adagrad adds no `epsilon` (Keras adds 1e-7 outside the root).
        - Adam, SGD and momentum (Nesterov too) compute the same update as
          Keras' with the same hyperparameters, up to rounding.

    Raises:
        ValueError: For an unknown name or a hyperparameter the kind lacks.
        TypeError: For an optimizer object of another kind.

    Example:

    ```python
    model.compile(optimizer=NativeOptimizer("adam", learning_rate=1e-3), loss=...)
    model.compile(optimizer=NativeOptimizer(tf.compat.v1.train.AdamOptimizer(1e-3)), ...)
    ```
    """

    def __init__(self, optimizer: str | tf.compat.v1.train.Optimizer = "sgd", **hyperparameters):
        name = hyperparameters.pop("name", None)
        if isinstance(optimizer, tf.compat.v1.train.Optimizer):
            if hyperparameters:
                raise ValueError(
                    "Pass hyperparameters either through the TensorFlow optimizer or "
                    f"as arguments, not both. Received: {sorted(hyperparameters)}"
                )
            kind, settings = _from_tf_optimizer(optimizer)
        elif isinstance(optimizer, str):
            kind = optimizer.lower()
            if kind not in _DEFAULTS:
                raise ValueError(
                    f"Unknown native optimizer. Received: optimizer={optimizer!r}. "
                    f"Choose one of {list(KINDS)} or pass a tf.compat.v1.train optimizer."
                )
            unknown = sorted(set(hyperparameters) - set(_DEFAULTS[kind]))
            if unknown:
                raise ValueError(
                    f"The native {kind!r} optimizer has no hyperparameter(s) {unknown}. "
                    f"It takes {sorted(_DEFAULTS[kind])}."
                )
            settings = {**_DEFAULTS[kind], **hyperparameters}
        else:
            raise TypeError(
                "`optimizer` must be a name or a tf.compat.v1.train optimizer. Received: "
                f"optimizer={optimizer!r} of type {type(optimizer).__name__}"
            )
        settings = dict(settings)
        learning_rate = settings.pop("learning_rate")
        if callable(learning_rate) and not isinstance(
            learning_rate, keras.optimizers.schedules.LearningRateSchedule
        ):
            learning_rate = learning_rate()
        super().__init__(learning_rate=learning_rate, name=name or f"native_{kind}")
        self.kind = kind
        self.hyperparameters = settings

    def build(self, variables: list[Any]) -> None:
        if self.built:
            return
        super().build(variables)
        h = self.hyperparameters
        self._slots: dict[str, list[Any]] = {}

        def slots(name: str, initializer: str = "zeros") -> None:
            self._slots[name] = [
                self.add_variable_from_reference(v, name, initializer=initializer)
                for v in variables
            ]

        if self.kind == "momentum":
            slots("momentum")
        elif self.kind == "adam":
            slots("m")
            slots("v")
        elif self.kind == "rmsprop":
            slots("rms", "ones")
            slots("momentum")
            if h["centered"]:
                slots("mg")
        elif self.kind == "adagrad":
            slots("accumulator", keras.initializers.Constant(h["initial_accumulator_value"]))

    def _slot(self, name: str, variable: Any) -> Any:
        return _handle(self._slots[name][self._get_variable_index(variable)])

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)
        dtype = variable.dtype
        lr = tf.cast(learning_rate, dtype)
        var = _handle(variable)
        h = self.hyperparameters
        raw = tf.raw_ops
        if self.kind == "sgd":
            raw.ResourceApplyGradientDescent(var=var, alpha=lr, delta=gradient)
        elif self.kind == "momentum":
            raw.ResourceApplyMomentum(
                var=var,
                accum=self._slot("momentum", variable),
                lr=lr,
                grad=gradient,
                momentum=tf.cast(h["momentum"], dtype),
                use_nesterov=bool(h["nesterov"]),
            )
        elif self.kind == "adam":
            step = tf.cast(self.iterations + 1, dtype)
            raw.ResourceApplyAdam(
                var=var,
                m=self._slot("m", variable),
                v=self._slot("v", variable),
                beta1_power=tf.pow(tf.cast(h["beta_1"], dtype), step),
                beta2_power=tf.pow(tf.cast(h["beta_2"], dtype), step),
                lr=lr,
                beta1=tf.cast(h["beta_1"], dtype),
                beta2=tf.cast(h["beta_2"], dtype),
                epsilon=tf.cast(h["epsilon"], dtype),
                grad=gradient,
            )
        elif self.kind == "rmsprop":
            common = {
                "var": var,
                "ms": self._slot("rms", variable),
                "mom": self._slot("momentum", variable),
                "lr": lr,
                "rho": tf.cast(h["rho"], dtype),
                "momentum": tf.cast(h["momentum"], dtype),
                "epsilon": tf.cast(h["epsilon"], dtype),
                "grad": gradient,
            }
            if h["centered"]:
                raw.ResourceApplyCenteredRMSProp(mg=self._slot("mg", variable), **common)
            else:
                raw.ResourceApplyRMSProp(**common)
        elif self.kind == "adagrad":
            raw.ResourceApplyAdagrad(
                var=var, accum=self._slot("accumulator", variable), lr=lr, grad=gradient
            )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"optimizer": self.kind, **self.hyperparameters})
        for key in (
            "weight_decay",
            "clipnorm",
            "global_clipnorm",
            "clipvalue",
            "use_ema",
            "ema_momentum",
            "ema_overwrite_frequency",
            "loss_scale_factor",
            "gradient_accumulation_steps",
            "is_legacy_optimizer",
        ):
            config.pop(key, None)
        return config
