"""`replicate-bench` (or `python -m benchmarks`): scaling|optimizers|precision|consistency|
agreement|startup|overhead|profile.

Parsing imports nothing heavy: `--help` and a wrong argument answer before
TensorFlow is imported; the benchmark modules load once a command runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from replicate import bench
from replicate.cli import check_package, positive_int


def _choices(allowed):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(bad) or 'empty list'}; choose from {', '.join(allowed)}"
            )
        return items

    return parse


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="replicate-bench", description="replicate's benchmarks (ratios against peers)."
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (
        ("scaling", "examples/s against the number of towers, against peers"),
        ("optimizers", "Keras 3 optimizers against native TensorFlow optimizers"),
        ("precision", "mixed precision through replicate against one device (closeness)"),
        ("consistency", "the per-step cost of ConsistencyCheck across 2 processes"),
        ("startup", "time to the first step at 1-8 towers, against MirroredStrategy"),
        ("overhead", "the steady-state cost per tower, against MirroredStrategy"),
        ("agreement", "the per-step cost of the agreement token across 2 processes"),
        ("profile", "where a 2-process step's time goes, under each backend"),
    ):
        p = commands.add_parser(name, help=help_text)
        p.add_argument("--quick", action="store_true", help="a short run (minutes on 2 cores)")
        p.add_argument("--output", default="benchmark-results", help="report folder")
        p.add_argument(
            "--devices",
            type=positive_int,
            default=2,
            help=(
                "devices: GPUs if present, else simulated CPU devices "
                "(default 2; 8 for startup and overhead)"
            ),
        )
        p.add_argument("--repeats", type=positive_int, help="counted repeats per process")
        p.add_argument("--processes", type=positive_int, help="fresh processes or jobs (default 2)")
        p.add_argument("--steps", type=positive_int, help="steps per timed pass")
        p.add_argument("--batch", type=positive_int, help="global batch")
    sc = commands.choices["scaling"]
    sc.add_argument(
        "--model",
        dest="models",
        type=_choices(bench.MODELS),
        default=["mlp", "convnet"],
        help="mlp, convnet, resnet or a comma list (default mlp,convnet)",
    )
    sc.add_argument(
        "--methods",
        type=_choices(bench.METHODS),
        default=list(bench.METHODS),
        help="comma list of fit, replicate, mirrored, horovod, collective (default all)",
    )
    op = commands.choices["optimizers"]
    op.add_argument(
        "--optimizer",
        dest="optimizer_names",
        type=_choices(bench.OPTIMIZERS),
        default=list(bench.OPTIMIZERS),
        help="comma list (default all)",
    )
    op.add_argument("--model", dest="model", choices=bench.MODELS, default="mlp")
    st = commands.choices["startup"]
    st.add_argument(
        "--model",
        dest="model",
        choices=("resnet", "resnet-sync", "mlp"),
        default="resnet",
        help="ResNet50V2 on 32x32x3 (default), the same with synchronized "
        "BatchNormalization (resnet-sync), or the MLP 32-32-10",
    )
    st.add_argument(
        "--phases",
        action="store_true",
        help="also split replicate's first step: again with TensorFlow's graph optimizer "
        "(Grappler) off, and the second one-step fit (no tracing)",
    )
    for name in ("startup", "overhead"):
        commands.choices[name].set_defaults(devices=8)
    return top


def main(argv: list[str] | None = None) -> int:
    check_package()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = parser().parse_args(argv)
    if args.command == "scaling":
        from replicate.bench import scaling

        scaling.run(args)
    elif args.command == "optimizers":
        from replicate.bench import optimizers

        optimizers.run(args)
    elif args.command == "profile":
        from replicate.bench import profile

        profile.run(args)
    elif args.command in ("startup", "overhead"):
        from replicate.bench import startup

        startup.run(args)
    else:
        from replicate.bench import checks

        checks.run(args)
    print(f"wrote {args.command}.json and .md (and a .png chart, if any) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
