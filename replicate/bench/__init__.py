"""replicate's benchmark suite: scaling against peers, Keras against native optimizers.

Run it as `replicate-bench`, or `python -m benchmarks` from a checkout. The
choices below live here, apart from the modules that use them, so that the
command line can list them without importing TensorFlow.
"""

MODELS = ("mlp", "convnet", "resnet")
METHODS = ("fit", "replicate", "mirrored", "horovod", "collective")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "rmsprop", "adagrad")
