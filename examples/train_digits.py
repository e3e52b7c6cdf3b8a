"""Training over towers on one machine, or across processes (collective backend or Horovod).

One machine, every GPU (or 2 simulated devices on a machine without GPUs):

    python examples/train_digits.py

Several processes (here 2 on this machine), on TensorFlow's collective runtime:

    replicate launch --nproc 2 -- python examples/train_digits.py --backend collective

or with Horovod (across hosts use -H host1:1,host2:1):

    horovodrun -np 2 -H localhost:2 --gloo python examples/train_digits.py --backend horovod

Each process takes its own towers (its share of the host's GPUs, or simulated
devices), trains on its shard of the data, and the backend combines the
gradients across processes. The data is sharded first and shuffled after:
each process shuffles its own shard with its own seed, and the shards stay
disjoint (shuffling before `replicate.shard` is refused). Only rank 0 prints,
and `save` writes on rank 0 while the others wait for it.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import replicate  # noqa: E402
from replicate.callbacks import LearningRateWarmup  # noqa: E402
from replicate.demo import load_digits, make_convnet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend",
        choices=["local", "horovod", "collective"],
        default="local",
        help="local: one process (default); horovod under horovodrun; collective under "
        "replicate launch",
    )
    parser.add_argument("--devices", type=int, default=2, help="towers per process")
    parser.add_argument("--epochs", type=int, default=12, help="default 12")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument(
        "--output", default="digits_convnet.keras", help="where rank 0 saves the model"
    )
    args = parser.parse_args()

    # Before TensorFlow starts: simulated devices (no GPU), then the backend
    # (the collective runtime is configured then).
    if not tf.config.list_physical_devices("GPU"):
        replicate.simulate_devices(args.devices)
    backend = replicate.get_backend(args.backend)
    devices = replicate.process_devices()[: args.devices]  # this process's GPUs
    keras.utils.set_random_seed(backend.rank)  # rank 0's start wins
    (x_train, y_train), (x_test, y_test) = load_digits()
    with tf.device("/cpu:0"):
        model = make_convnet()
    parallel = replicate.replicate(model, devices, backend=backend)
    processes = parallel.backend.size
    # Shard, then shuffle (each process in its own order, within its shard), then batch.
    train = replicate.shard(tf.data.Dataset.from_tensor_slices((x_train, y_train)))
    train = train.shuffle(len(x_train), seed=backend.rank).batch(args.batch_size)

    # The global batch grows with the processes: scale the rate, and warm it up.
    rate = 2e-3 * processes
    parallel.compile(
        optimizer=keras.optimizers.Adam(rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    parallel.fit(
        train,
        epochs=args.epochs,
        shuffle=False,  # the dataset shuffles after sharding (above); fit cannot shuffle it
        verbose=2,
        callbacks=[LearningRateWarmup(rate, warmup_epochs=2)],
    )
    loss, accuracy = parallel.evaluate(*replicate.shard((x_test, y_test)), verbose=0)
    parallel.save(args.output)  # every process calls it; rank 0 writes, the others wait
    if replicate.is_chief():
        print(f"processes: {processes}, towers per process: {len(devices)}")
        print(f"test accuracy: {accuracy:.4f}")


if __name__ == "__main__":
    main()
