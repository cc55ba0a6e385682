"""`python -m benchmarks.case STAGE IMPL [IMAGES]`: run one benchmark case in this process; print its JSON."""

from __future__ import annotations

import json
import sys

from benchmarks.measure import measure
from benchmarks.suite import CASES
from pipeline.devices import best_device


def main() -> None:
    stage, impl, *images = sys.argv[1:]
    device = best_device()
    work, counts = CASES[stage](device, impl, *(int(n) for n in images))
    print(json.dumps({**measure(work, device), **counts}))


if __name__ == "__main__":
    main()
