"""`python -m benchmarks scaling|optimizers [--quick] [--output DIR] ...`."""

import sys

from replicate.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
