"""The `replicate` command: `demo`, `devices`, `export` and `launch`."""

from __future__ import annotations

import argparse
import os
import sys


def check_package() -> None:
    """Stops a command whose `replicate` package is not this project's.

    The unrelated API client distributed as `replicate` installs a package of
    the same import name; if it was installed over this one, its
    `replicate/__init__.py` runs instead of ours.
    """
    import replicate

    if getattr(replicate, "__distribution__", None) != "keras-replicate":
        raise SystemExit(
            f"replicate: error: the package `replicate` in this environment "
            f"({getattr(replicate, '__file__', None)}) is not keras-replicate's: another "
            "distribution of the same import name (the `replicate` API client) was "
            "installed over it. The two cannot share one environment; install "
            "keras-replicate in a virtual environment of its own."
        )


def positive_int(text: str) -> int:
    """argparse type: a positive integer, with an error naming the bad text."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="replicate", description="Data-parallel training of Keras models on TensorFlow."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="train a small convnet on the 8x8 digits over several devices"
    )
    demo.add_argument(
        "--devices",
        type=positive_int,
        default=2,
        help="number of towers: GPUs if present, else simulated CPU devices (default 2)",
    )
    demo.add_argument("--epochs", type=positive_int, default=15, help="default 15")
    demo.add_argument(
        "--batch-size", type=positive_int, default=64, help="global batch, default 64"
    )
    demo.add_argument(
        "--output",
        default="digits_convnet.keras",
        help="where to save the trained template model (default digits_convnet.keras; '' to skip)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    commands.add_parser("devices", help="list TensorFlow's devices and the GPUs NVML sees")

    export = commands.add_parser(
        "export", help="export a saved Keras model as a SavedModel for TensorFlow Serving"
    )
    export.add_argument("model", help="a model saved with model.save (.keras)")
    export.add_argument("export_base", help="folder of numbered versions, e.g. models/digits")
    export.add_argument(
        "--version", type=positive_int, help="version number (default: the next free one)"
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing version")

    launch = commands.add_parser(
        "launch",
        help="run a training script as several processes (collective backend, TF_CONFIG)",
        description="Starts --nproc processes of one job on this machine, each with its "
        "TF_CONFIG, RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; prefixes their "
        "output with the rank; when one fails, stops the others and exits with its status.",
    )
    launch.add_argument("--nproc", type=positive_int, required=True, help="processes on this host")
    launch.add_argument(
        "--hosts",
        type=lambda text: [h for h in text.split(",") if h],
        help="every host of the job, in the same order on each (default: this one only)",
    )
    launch.add_argument(
        "--node-rank", type=int, default=0, help="this host's place in --hosts (default 0)"
    )
    launch.add_argument(
        "--port",
        type=positive_int,
        help="first of --nproc consecutive ports on every host (required with --hosts; "
        "default: free ports on the loopback interface, 127.0.0.1)",
    )
    launch.add_argument(
        "command_line",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND",
        help="what each process runs (a script.py by itself runs under this Python)",
    )
    return parser


def _tower_devices(count: int) -> list[str]:
    import tensorflow as tf

    import replicate

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return replicate.simulate_devices(count)
    if count > len(gpus):
        raise SystemExit(
            f"replicate: error: --devices {count} asks for more GPUs than the "
            f"{len(gpus)} this machine has"
        )
    return [f"/gpu:{i}" for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    check_package()
    args = _parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.command == "demo":
        from replicate import demo

        devices = _tower_devices(args.devices)
        demo.run(
            devices,
            epochs=args.epochs,
            batch_size=args.batch_size,
            output=args.output or None,
            seed=args.seed,
        )
        return 0
    if args.command == "devices":
        import replicate
        from replicate import telemetry

        print("TensorFlow devices (towers by default):")
        for name in replicate.list_devices():
            print(f"  {name}")
        print("GPUs (NVML):")
        print(telemetry.format_table(telemetry.gpu_stats()))
        from replicate.backends.horovod import build_info

        info = build_info()
        if info["installed"]:
            built = ", ".join(k.upper() for k in ("gloo", "mpi", "nccl", "cuda") if info[k])
            print(f"Horovod {info['version']}: built with {built or 'no collectives'}")
        else:
            print(f"Horovod: not installed ({info['reason']})")
        return 0
    if args.command == "launch":
        from replicate import launch

        command = list(args.command_line)
        if command[:1] == ["--"]:
            command = command[1:]
        try:
            return launch.run(
                command,
                args.nproc,
                hosts=args.hosts,
                node_rank=args.node_rank,
                port=args.port,
            )
        except ValueError as error:
            raise SystemExit(f"replicate launch: error: {error}") from None
    if args.command == "export":
        from pathlib import Path

        import keras

        from replicate.export import export_saved_model, next_version

        if not Path(args.model).is_file():
            raise SystemExit(f"replicate export: error: no model file at {args.model!r}")
        target = Path(args.export_base) / str(args.version)
        if args.version is not None and target.exists() and not args.overwrite:
            raise SystemExit(
                f"replicate export: error: version {args.version} already exists at "
                f"{str(target)!r}. Add --overwrite to replace it, or leave out --version to "
                f"write the next free number ({next_version(args.export_base)})."
            )
        try:
            # Keras' safe mode (its default): no code stored in a model file runs.
            model = keras.models.load_model(args.model, safe_mode=True)
        except ValueError as error:
            raise SystemExit(f"replicate export: error: {error}") from None
        try:
            path = export_saved_model(
                model, args.export_base, version=args.version, overwrite=args.overwrite
            )
        except (FileExistsError, ValueError) as error:
            raise SystemExit(f"replicate export: error: {error}") from None
        print(f"exported {args.model} to {path}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
