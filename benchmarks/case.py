"""`python -m benchmarks.case STAGE IMPL [SIZES]`: run one benchmark case in this process; print its JSON.
A size given as "-" is None: the case's default."""

from __future__ import annotations

import json
import sys

from benchmarks.measure import measure
from benchmarks.suite import CASES
from pipeline.core import distributed
from pipeline.core.devices import best_device


def run(stage: str, impl: str, *sizes: str) -> dict:
    """One case in this process: what its work measured (seconds, peak memory) and what the work processed
    (the case's own figures, some filled in by the work)."""
    device = best_device()
    work, counts = CASES[stage](device, impl, *(None if n == "-" else int(n) for n in sizes))
    return {**measure(work, device), **counts}


def main() -> None:
    """Under torchrun (the processes cases) every rank runs the case and the main rank prints."""
    stage, impl, *sizes = sys.argv[1:]
    with distributed.session():
        result = run(stage, impl, *sizes)
        if distributed.is_main():
            print(json.dumps(result))


if __name__ == "__main__":
    main()
