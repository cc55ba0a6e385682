"""`python -m benchmarks.case STAGE IMPL [IMAGES]`: run one benchmark case in this process; print its JSON."""

from __future__ import annotations

import json
import sys

from benchmarks.measure import measure
from benchmarks.suite import CASES
from pipeline import distributed
from pipeline.devices import best_device


def main() -> None:
    """Under torchrun (the processes cases) every rank runs the case and the main rank prints."""
    stage, impl, *images = sys.argv[1:]
    with distributed.session():
        device = best_device()
        work, counts = CASES[stage](device, impl, *(int(n) for n in images))
        result = {**measure(work, device), **counts}
        if distributed.is_main():
            print(json.dumps(result))


if __name__ == "__main__":
    main()
