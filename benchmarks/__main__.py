"""`python -m benchmarks`: every stage, viclip against the reference, at full model size; prints a
table and writes the results as JSON, after each stage. Each case runs in a fresh process (see suite.py)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import get_args

import torch

from benchmarks import workload
from benchmarks.suite import SCALING, VARIANTS, VariantSize
from pipeline.core.devices import Precision, best_device, hardware, precision
from pipeline.core.io import write_json

STAGES = ("extract", "train", "decode", "profile", "score", "scaling", "processes", "streaming", "serve", "variants")
STREAMED_IMAGES = 2_000  # CNN grids in the streaming case: 400 MB of float16, which fits this machine
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
    rows = [row("extract", "images/s from JPEG files", "img/s",
                ours["images"] / ours["seconds"], theirs["images"] / theirs["seconds"]),
            row("extract", "peak memory (process)", "MB", ours["peak_mb"], theirs["peak_mb"])]
    if ours["jpeg_decoder"] != "pillow":  # decoded on the device: against Pillow in the loader's workers
        workers = run_case("extract", "workers")
        rows.append(row("extract", f"JPEGs decoded by {ours['jpeg_decoder']} against by Pillow in the workers "
                        "(viclip: device, reference: workers)", "img/s",
                        ours["images"] / ours["seconds"], workers["images"] / workers["seconds"]))
    return rows


def train(device: torch.device) -> list[dict]:
    ours, theirs = pair("train")
    rows = [
        row("train", "captions/s", "captions/s", ours["captions"] / ours["seconds"],
            theirs["captions"] / theirs["seconds"]),
        row("train", "tokens/s", "tokens/s", ours["tokens"] / ours["seconds"], theirs["tokens"] / theirs["seconds"]),
        row("train", "peak memory", "MB", ours["peak_mb"], theirs["peak_mb"]),
    ]
    rows += compiled_against_eager("train", ours, "captions", "first epoch, compiling the step included")
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


def compiled_against_eager(stage: str, ours: dict, unit: str, warm_up: str) -> list[dict]:
    """The step the device does not run by default, against the one it does: compiled against eager, in `unit`s
    a second; and the compiled case's warm-up (`warm_up`), its compiles included."""
    if not ours["compiled"] and shutil.which("g++") is None:
        print(f"benchmark {stage}: no g++, so no compiled step to time against the eager one", file=sys.stderr)
        return []
    other = run_case(stage, "eager" if ours["compiled"] else "compiled")
    compiled, eager = (ours, other) if ours["compiled"] else (other, ours)
    return [row(stage, "compiled step against the eager one (viclip: compiled, reference: eager)", f"{unit}/s",
                compiled[unit] / compiled["seconds"], eager[unit] / eager["seconds"],
                default="compiled" if ours["compiled"] else "eager"),
            row(stage, warm_up, "s", compiled["warm_up_seconds"])]


def decode() -> list[dict]:
    ours, theirs = pair("decode")
    rows = [row("decode", "captions/s, beam 5, full length", "captions/s",
                ours["captions"] / ours["seconds"], theirs["captions"] / theirs["seconds"]),
            row("decode", "peak memory", "MB", ours["peak_mb"], theirs["peak_mb"])]
    rows += compiled_against_eager("decode", ours, "captions", "first pass over the images, compiling the step included")
    if ours["captions"] == workload.TEST_IMAGES:  # a GPU's workload
        rows.append(row("decode", f"KTVIC test split: {workload.TEST_IMAGES} images, beam 5, full length", "s",
                        ours["seconds"]))
    return rows


def profile() -> list[dict]:
    """One training step and one decode step under torch.profiler: where a step's time goes."""
    rows = []
    for impl, what in (("train", "training step"), ("decode", "beam-search step")):
        case = run_case("profile", impl)
        label = f"{what}{' (compiled)' if case['compiled'] else ''}"
        rows += [row("profile", f"{label}: kernels (CPU: aten ops called)", "count", case["kernels_a_step"]),
                 row("profile", f"{label}: host time to issue it", "s", case["host_seconds_a_step"]),
                 row("profile", f"{label}: wall time", "s", case["wall_seconds_a_step"])]
        if case["gpu_busy"] is not None:
            rows.append(row("profile", f"{label}: share of the wall time the GPU computes", "fraction", case["gpu_busy"]))
    return rows


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


def launched(processes: int, *args: str) -> dict:
    """A case on `processes` processes of this machine, started as torchrun starts them."""
    if processes == 1:
        return run_case(*args)
    return run_case("--standalone", f"--nproc-per-node={processes}", "-m", "benchmarks.case", *args,
                    module="torch.distributed.run")


def processes() -> list[dict]:
    """viclip's train epoch on one process against two (DDP; gloo on a CPU, NCCL on GPUs), and the
    all-reduce of the mapper's gradients that each step adds."""
    one, two = launched(1, "processes", "viclip"), launched(2, "processes", "viclip")
    exchange = launched(2, "all_reduce", "viclip")
    return [
        row("processes", f"train captions/s, 2 processes vs 1 ({one['captions']} captions)", "captions/s",
            two["captions"] / two["seconds"], one["captions"] / one["seconds"]),
        row("processes", "peak memory per process, 2 processes vs 1", "MB", two["peak_mb"], one["peak_mb"]),
        row("processes", f"all-reduce of the mapper's gradients ({exchange['bytes'] / 2**20:,.0f} MB fp32)", "s",
            exchange["seconds"] / exchange["repeats"]),
    ]


def streaming() -> list[dict]:
    """The baseline trained from a store of CNN grids held in memory, against the same store read from disk
    batch by batch: the streamed run's memory does not grow with the store."""
    memory, disk = (run_case("streamed_train", impl, str(STREAMED_IMAGES)) for impl in ("memory", "disk"))
    if not disk["streamed"] or memory["streamed"]:
        raise SystemExit("benchmark streaming: the memory budget did not decide as the case asked")
    label = f"{STREAMED_IMAGES:,} images ({memory['store_mb']:,.0f} MB store)"
    return [
        row("streaming", f"baseline train step, {label}: from disk vs in memory", "s",
            disk["seconds"] / disk["steps"], memory["seconds"] / memory["steps"]),
        row("streaming", f"baseline peak memory, {label}: from disk vs in memory", "MB",
            disk["peak_mb"], memory["peak_mb"]),
    ]


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
        label = "demo models" if models == "demo" else f"ViT-B-32 + {workload.lm_name()}"
        for ours, theirs in zip(batched["levels"], single["levels"]):
            clients = f"{label}, {ours['concurrency']} clients"
            rows += [
                row("serve", f"{clients}: requests/s", "requests/s", ours["requests_per_s"], theirs["requests_per_s"],
                    requests=(ours["requests"], theirs["requests"])),
                row("serve", f"{clients}: p50 latency", "s", ours["p50_s"], theirs["p50_s"]),
                row("serve", f"{clients}: p95 latency", "s", ours["p95_s"], theirs["p95_s"]),
            ]
    return rows


# SCST's step by part: the two the case times, and what is left of the step.
SCST_PARTS = {"sample": "sampling (KV cache)", "reward": "rewards (CiderD.scores)",
              "rest": "samples to text, weighted loss, backward, optimiser"}


def variants(size: VariantSize = VariantSize()) -> list[dict]:
    """A training step of each of ViCLIPCap's variants (suite.variant; the median of the case's steps)
    against viclipcap's cross-entropy step in the same run (`reference`; `cost`: how many of its seconds the
    step takes). SCST's step also by part, each with its `share` of the step."""
    cases = {model: run_case("variant", model, *size.args()) for model in VARIANTS}
    reference = statistics.median(cases[VARIANTS[0]]["seconds"]["step"])
    rows = []
    for model, case in cases.items():
        laps = case["seconds"]
        step = statistics.median(laps["step"])
        name = model.replace(":", ", lm.train ")
        rows.append(row("variants", f"{name}: training step, {_batch(case)}", "s", step, reference, variant=model,
                        cost=step / reference, peak_mb=case["peak_mb"], optimizer_mb=case["optimizer_mb"],
                        trained_parameters=case["trained_parameters"], steps=len(laps["step"])))
        if "sampled" in case:
            laps["rest"] = [s - a - b for s, a, b in zip(laps["step"], laps["sample"], laps["reward"])]
            rows += [row("variants", f"{name}: of which {label}", "s", statistics.median(laps[part]), step,
                         variant=model, share=statistics.median(t / s for t, s in zip(laps[part], laps["step"])))
                     for part, label in SCST_PARTS.items()]
    return rows


def _batch(case: dict) -> str:
    """What a variant case's step processed."""
    if "sampled" not in case:
        return f"{case['captions']} captions, {statistics.mean(case['positions']) / case['captions']:.0f} LM positions each"
    longest = max(s["longest"] for s in case["sampled"])
    mean = statistics.mean(s["mean"] for s in case["sampled"])
    return f"{case['images']} images x {case['samples']} samples of {longest} tokens (mean {mean:.1f})"


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
    parser.add_argument("--lm", choices=list(workload.LMS), default=workload.lm_name(),
                        help="The LM's shape, random weights at full size, in every case that runs an LM.")
    args = parser.parse_args()
    os.environ[workload.BENCH_LM] = args.lm  # inherited by every case's process
    if args.precision:
        os.environ["VICLIP_PRECISION"] = args.precision  # inherited by every case's process

    device = best_device()
    runs = {"extract": extract, "train": lambda: train(device), "decode": decode, "profile": profile, "score": score,
            "scaling": scaling, "processes": processes, "streaming": streaming,
            "serve": lambda: serve(args.demo.resolve()), "variants": variants}
    started = time.perf_counter()
    machine = {
        "date": datetime.date.today().isoformat(),
        "device": hardware(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "lm": args.lm,
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
