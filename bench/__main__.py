"""``python -m bench``: the same as ``herald bench`` (see :mod:`bench.suite`)."""

from bench.harness import run_main
from bench.suite import main

if __name__ == "__main__":
    run_main(lambda: main(prog="python -m bench"))
