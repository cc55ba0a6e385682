"""`python -m benchmarks`: every stage, viclip against the reference, at full model size; prints a
table and writes the results as JSON, after each stage. Each case runs in a fresh process (see suite.py)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import get_args

import torch

from benchmarks.suite import SCALING
from pipeline.devices import Precision, best_device, hardware, precision
from pipeline.io import write_json

STAGES = ("extract", "train", "decode", "score", "scaling", "serve")
# Dense bf16 tensor-core peaks from NVIDIA's data sheets (FLOP/s), by device name.
BF16_PEAKS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))


def run_case(*args: str, module: str = "benchmarks.case") -> dict:
    """One case in a process of its own (`python -m MODULE ARGS`); the JSON it prints last."""
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"benchmark case {' '.join(args)} failed")
    return json.loads(result.stdout.strip().splitlines()[-1])


def row(stage: str, measure: str, unit: str, viclip: float, reference: float | None = None, **extra) -> dict:
    """One figure; `ratio` is how many times faster viclip is (rates only: memory is a trade-off)."""
    ratio = viclip / reference if reference and unit.endswith("/s") else None
    return {"stage": stage, "measure": measure, "unit": unit, "viclip": viclip, "reference": reference,
            "ratio": ratio, **extra}


def pair(stage: str) -> tuple[dict, dict]:
    return run_case(stage, "viclip"), run_case(stage, "reference")


def extract() -> list[dict]:
    ours, theirs = pair("extract")
    return [row("extract", "images/s from JPEG files", "img/s",
                ours["images"] / ours["seconds"], theirs["images"] / theirs["seconds"]),
            row("extract", "peak memory (process)", "MB", ours["peak_mb"], theirs["peak_mb"])]


def train(device: torch.device) -> list[dict]:
    ours, theirs = pair("train")
    rows = [
        row("train", "captions/s", "captions/s", ours["captions"] / ours["seconds"],
            theirs["captions"] / theirs["seconds"]),
        row("train", "tokens/s", "tokens/s", ours["tokens"] / ours["seconds"], theirs["tokens"] / theirs["seconds"]),
        row("train", "peak memory", "MB", ours["peak_mb"], theirs["peak_mb"]),
    ]
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((p for key, p in BF16_PEAKS if key in name), float("nan"))
        rows += [
            row("train", "fraction of the GPU's bf16 matrix rate", "fraction",
                ours["matrix_flops"] / ours["seconds"] / peak),
            row("train", "KTVIC run: 18,845 captions x 10 epochs", "s",
                10 * 18_845 / (ours["captions"] / ours["seconds"])),
        ]
    return rows


def decode() -> list[dict]:
    ours, theirs = pair("decode")
    return [row("decode", "captions/s, beam 5, full length", "captions/s",
                ours["captions"] / ours["seconds"], theirs["captions"] / theirs["seconds"]),
            row("decode", "peak memory", "MB", ours["peak_mb"], theirs["peak_mb"])]


def score() -> list[dict]:
    timed = run_case("score", "viclip")
    return [row("score", f"{timed['images']} images x 5 references, METEOR included", "s", timed["seconds"])]


def scaling() -> list[dict]:
    rows = []
    for images in SCALING:
        step = run_case("scaling_train", "viclip", str(images))
        batch = run_case("scaling_decode", "viclip", str(images))
        per_step = step["seconds"] / step["steps"]
        rows += [
            row("scaling", f"{images:,} images: train step", "s", per_step, peak_mb=step["peak_mb"],
                store_mb=step["store_mb"]),
            row("scaling", f"{images:,} images: decode batch of {batch['batch']}", "s", batch["seconds"],
                peak_mb=batch["peak_mb"]),
        ]
    return rows


def serve(demo: Path) -> list[dict]:
    """viclip serve under load (benchmarks/load.py): micro-batching against one request at a time, with the
    demo's two trained models (where `demo` holds a built demo) and with full-size random-weight models."""
    rows = []
    for models in ("demo", "full"):
        if models == "demo" and not (demo / "artifacts/models/viclipcap").is_dir():
            print(f"benchmark: serve: no demo project at {demo} (make demo builds one); demo models skipped",
                  file=sys.stderr)
            continue
        args = [str(demo)] if models == "demo" else []
        batched, single = (run_load(models, mode, *args) for mode in ("batched", "single"))
        label = "demo models" if models == "demo" else "ViT-B-32 + GPT-2 small"
        for ours, theirs in zip(batched["levels"], single["levels"]):
            clients = f"{label}, {ours['concurrency']} clients"
            rows += [
                row("serve", f"{clients}: requests/s", "requests/s", ours["requests_per_s"], theirs["requests_per_s"],
                    requests=(ours["requests"], theirs["requests"])),
                row("serve", f"{clients}: p50 latency", "s", ours["p50_s"], theirs["p50_s"]),
                row("serve", f"{clients}: p95 latency", "s", ours["p95_s"], theirs["p95_s"]),
            ]
    return rows


def run_load(*args: str) -> dict:
    """One load case (benchmarks/load.py) in a process of its own, its server in another; every request answered."""
    case = run_case(*args, module="benchmarks.load")
    errors = sum(level["error_count"] for level in case["levels"])
    if errors:
        raise SystemExit(f"load case {' '.join(args)}: {errors} requests failed, e.g. {case['levels'][0]['errors']}")
    return case


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--only", nargs="+", choices=STAGES, default=list(STAGES), help="Run only these.")
    parser.add_argument("--out", default="benchmarks/results.json", help="Where to write the results (JSON).")
    parser.add_argument("--demo", type=Path, default=Path("demo-run"),
                        help="The demo project whose models the serve stage loads (make demo builds it).")
    parser.add_argument("--precision", choices=get_args(Precision),
                        help="viclip's training precision (VICLIP_PRECISION in each case's process) instead of the "
                             "device's policy; the reference always trains in fp32, as ClipCap does.")
    args = parser.parse_args()
    if args.precision:
        os.environ["VICLIP_PRECISION"] = args.precision  # inherited by every case's process

    device = best_device()
    runs = {"extract": extract, "train": lambda: train(device), "decode": decode, "score": score,
            "scaling": scaling, "serve": lambda: serve(args.demo.resolve())}
    started = time.perf_counter()
    machine = {
        "date": datetime.date.today().isoformat(),
        "device": hardware(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "precision": precision(device),  # viclip trains at the policy's (or --precision's); the reference at fp32
        "command": " ".join(["python -m benchmarks", *sys.argv[1:]]),
        "seconds": 0.0,
    }
    rows, done = [], []
    for stage in args.only:
        print(f"benchmark: {stage} ...", file=sys.stderr, flush=True)
        stage_rows = runs[stage]()
        rows += stage_rows
        done.append(stage)
        machine["seconds"] = round(time.perf_counter() - started, 1)
        # Written after every stage, so that a run cut short still leaves what it measured.
        write_json(args.out, {"machine": machine, "stages": done, "rows": rows})
        print(table(stage_rows), file=sys.stderr, flush=True)
    print(table(rows))
    print(f"\n{machine['device']}, torch {machine['torch']}, {machine['date']}, {machine['seconds']} s -> {args.out}")


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def table(rows: list[dict]) -> str:
    lines = [f"{'stage':<8} {'measure':<66} {'viclip':>10} {'reference':>10} {'ratio':>7} {'peak MB':>8}"]
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.1f}x"
        lines.append(f"{r['stage']:<8} {r['measure'] + ' (' + r['unit'] + ')':<66} {_number(r['viclip']):>10} "
                     f"{_number(r['reference']):>10} {ratio:>7} {_number(r.get('peak_mb')):>8}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
