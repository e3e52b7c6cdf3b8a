"""Training over towers on one machine, or across processes with `horovodrun`.

One machine, every GPU (or 2 simulated devices on a machine without GPUs):

    python examples/train_digits.py

Several processes (here 2 on this machine; across hosts use -H host1:1,host2:1):

    horovodrun -np 2 -H localhost:2 --gloo python examples/train_digits.py --backend horovod

Each process builds towers on its own devices, trains on its shard of the data, and
Horovod averages the gradients across processes. Only rank 0 prints and saves.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import replicate  # noqa: E402
from replicate.callbacks import LearningRateWarmup  # noqa: E402
from replicate.demo import load_digits, make_convnet  # noqa: E402


def tower_devices(per_process: int) -> list[str]:
    """This process's tower devices: its own GPUs, else simulated CPU devices.

    Processes on one host share its GPUs by local rank: process k takes GPUs
    k*n to k*n+n-1. This must run before TensorFlow starts.
    """
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return replicate.simulate_devices(per_process)
    local_rank = int(os.environ.get("HOROVOD_LOCAL_RANK", "0"))
    mine = gpus[local_rank * per_process : (local_rank + 1) * per_process]
    if len(mine) < per_process:
        raise SystemExit(f"local rank {local_rank} needs {per_process} GPUs; {len(gpus)} exist")
    tf.config.set_visible_devices(mine, "GPU")
    return [f"/gpu:{i}" for i in range(per_process)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["local", "horovod"], default="local")
    parser.add_argument("--devices", type=int, default=2, help="towers per process")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--output", default="digits_convnet.keras")
    args = parser.parse_args()

    devices = tower_devices(args.devices)
    keras.utils.set_random_seed(replicate.data.process_rank())  # rank 0's start wins
    (x_train, y_train), (x_test, y_test) = load_digits()
    with tf.device("/cpu:0"):
        model = make_convnet()
    parallel = replicate.replicate(model, devices, backend=args.backend)
    processes = parallel.backend.size
    x_mine, y_mine = replicate.shard((x_train, y_train))

    # The global batch grows with the processes: scale the rate, and warm it up.
    rate = 2e-3 * processes
    parallel.compile(
        optimizer=keras.optimizers.Adam(rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    parallel.fit(
        x_mine,
        y_mine,
        batch_size=args.batch_size,
        epochs=args.epochs,
        verbose=2,
        callbacks=[LearningRateWarmup(rate, warmup_epochs=2)],
    )
    loss, accuracy = parallel.evaluate(*replicate.shard((x_test, y_test)), verbose=0)
    parallel.save(args.output)  # rank 0 only
    if replicate.is_chief():
        print(f"processes: {processes}, towers per process: {len(devices)}")
        print(f"test accuracy: {accuracy:.4f}")


if __name__ == "__main__":
    main()
