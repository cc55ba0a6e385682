"""The benchmark suite's references do the same computation as viclip (only slower), and its command runs."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import chdir
from pathlib import Path

import pytest
import torch

from benchmarks import reference
from pipeline.core import paths, registry
from pipeline.data.datasets import load_splits
from pipeline.data.features import open_store
from pipeline.decoding.beam import beam_search
from pipeline.encoders.clip import load_clip
from pipeline.encoders.images import encode_files
from pipeline.models import load_model

CPU = torch.device("cpu")


def test_reference_extraction_gives_viclips_embeddings_once_per_caption(demo, config):
    with chdir(demo):
        encoder = load_clip(config.clip, CPU)
        files = [r.path.resolve() for r in load_splits(config.data)["test"][:3]]
    ours = torch.from_numpy(next(encode_files(encoder, files, 8, 0, CPU))[1])
    theirs = reference.extract(encoder, files, 5, CPU)
    assert theirs.shape == (15, ours.shape[1])
    assert torch.allclose(torch.nn.functional.normalize(theirs[::5], dim=-1), ours, atol=1e-5)


def test_reference_training_step_computes_viclips_loss(demo, config):
    with chdir(demo):
        captioner, spec = load_model("artifacts/models/viclipcap", CPU)
        captions = [c for r in load_splits(config.data)["val"][:4] for c in r.captions]
    ids = captioner.encode(captions)
    tokens = torch.zeros(len(ids), max(map(len, ids)) + 3, dtype=torch.long)  # padded past the longest
    for row, caption in enumerate(ids):
        tokens[row, : len(caption)] = torch.tensor(caption)
    embeddings = torch.nn.functional.normalize(torch.randn(len(ids), spec.store_attrs["embedding_dim"]), dim=-1)
    ours = captioner.loss(embeddings, tokens, tokens > 0).item()
    optimizer = torch.optim.SGD(captioner.parameters(), lr=0.0)
    assert abs(reference.train_step(captioner, embeddings, tokens, optimizer) - ours) < 1e-4


@torch.inference_mode()
def test_reference_beam_search_finds_viclips_captions(demo, config):
    with chdir(demo):
        captioner, spec = load_model("artifacts/models/viclipcap", CPU)
        features = torch.from_numpy(open_store(paths.store_path(config, "test"), {}).embeddings[:4])
    ours = beam_search(captioner, features, 3, 12, 1.0)
    for tokens, embedding in zip(ours.tokens, features):
        theirs = reference.beam_search(captioner, embedding, 3, 12)
        stop = captioner.stop_id
        assert (theirs[: theirs.index(stop)] if stop in theirs else theirs) == tokens


@pytest.mark.slow
def test_the_benchmark_command_writes_its_results(tmp_path):
    out = tmp_path / "results.json"
    # fp16: no device's own policy here; the LM is recorded, though the score stage runs none
    command = ["--only", "score", "--out", str(out), "--precision", "fp16", "--lm", "qwen2.5-0.5b"]
    result = subprocess.run([sys.executable, "-m", "benchmarks", *command],
                            capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    written = json.loads(out.read_text())
    assert written["machine"]["command"] == f"python -m benchmarks {' '.join(command)}"
    assert written["machine"]["precision"] == "fp16" and written["machine"]["lm"] == "qwen2.5-0.5b"
    [row] = written["rows"]
    assert row["stage"] == "score" and row["viclip"] > 0 and "score" in result.stdout


def test_segmentation_agreement_counts_words_by_their_syllable_spans(tmp_path):
    # underthesea joins "học sinh" and "xe máy": the first reference agrees, the second (all syllables
    # apart) shares only "đi". A third, "10-9_giờ", has punctuation inside a word and is left out.
    references = tmp_path / "segmented.txt"
    references.write_text("học_sinh đi xe_máy\nhọc sinh đi xe máy\nlúc 10-9_giờ\n", encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "benchmarks.segmentation", str(references), "--examples", "1"],
                          capture_output=True, text=True, check=True)
    off = done.stdout.split("use_token_normalize=False")[1].split("use_token_normalize=True")[0]
    assert "3 references, 2 used (1 left out: punctuation inside a word" in done.stdout
    assert "identical segmentation: 1 (50.0%)" in off
    assert "words: reference 8, underthesea 6, matching 4" in off
    assert "precision 66.67%  recall 50.00%  F1 57.14%" in off
    assert "học sinh  ->  học_sinh  (1)" in off


@pytest.mark.slow
def test_the_load_case_answers_every_request_at_every_level(demo, monkeypatch):
    """benchmarks.load against a real server on loopback, at a few requests a level (the client counts them)."""
    from benchmarks import load

    monkeypatch.setitem(load.REQUESTS, "demo", {1: 2, 8: 8, 32: 32})
    for mode in load.MODES:
        case = load.run_case("demo", mode, demo)
        assert case["served"] == list(registry.MODELS)
        levels = case["levels"]
        assert [(level["concurrency"], level["requests"], level["error_count"]) for level in levels] == [
            (1, 2, 0), (8, 8, 0), (32, 32, 0)]
        assert all(0 < level["p50_s"] <= level["p95_s"] < level["seconds"] + 1e-9 for level in levels)


def test_the_streaming_case_trains_the_baseline_from_disk_or_from_memory(monkeypatch):
    from benchmarks import suite
    from pipeline.core.devices import FEATURE_BUDGET

    monkeypatch.setenv(FEATURE_BUDGET, "")  # the disk case sets it; restored after the test
    for impl, streamed in (("memory", False), ("disk", True)):
        work, counts = suite.streamed_train(torch.device("cpu"), impl, 12, steps=1)
        work()
        assert counts["streamed"] is streamed and counts["images"] == 12


@pytest.mark.parametrize("lm", ["gpt2-small", "qwen2.5-0.5b"])
def test_the_variants_stage_measures_each_variant_against_the_cross_entropy_step(monkeypatch, lm):
    """At a tiny size of each LM shape, each case in this process (their subprocess path is the benchmark
    command's)."""
    from benchmarks import __main__ as command, case, workload
    from benchmarks.suite import VARIANTS, VariantSize

    monkeypatch.setenv(workload.BENCH_LM, lm)
    monkeypatch.setattr(command, "run_case", lambda *args: json.loads(json.dumps(case.run(*args))))
    rows = command.variants(VariantSize(steps=1, corpus=24, layers=1, width=64, batch=5))
    steps = [r for r in rows if "training step" in r["measure"]]
    assert [r["variant"] for r in steps] == list(VARIANTS)
    assert all(r["viclip"] > 0 and r["reference"] == steps[0]["viclip"] and r["steps"] == 1 for r in steps)
    assert steps[0]["cost"] == 1.0 and all(r["peak_mb"] > 0 and r["optimizer_mb"] > 0 for r in steps)
    parts = [r for r in rows if "of which" in r["measure"]]
    assert len(parts) == 3 and all(r["viclip"] >= 0 and 0 <= r["share"] <= 1 for r in parts)
    assert "5 images x 5 samples" in steps[VARIANTS.index("viclipcap_scst")]["measure"]
    trained = {r["variant"]: r["trained_parameters"] for r in steps}
    assert trained["viclipcap:lora"] > trained["viclipcap"]  # the adapters too
    vocabulary = workload.LMS[lm]().vocab_size  # 50,257 or 151,936
    assert trained["viclipcap_published"] > vocabulary * 64  # the LM too (its embeddings alone are this many)


def test_the_profile_counts_a_steps_ops_and_times_them():
    """`measure.profiled`, as the profile stage runs it on a CPU: aten ops called a step (not those they call in
    turn; kernels on a GPU), times a step."""
    from benchmarks.measure import profiled

    matrix = torch.randn(64, 64)
    figures = profiled(lambda: [torch.mm(matrix, matrix) for _ in range(6)], CPU, steps=3)
    assert figures["kernels_a_step"] == 2 and figures["steps"] == 3 and figures["gpu_busy"] is None
    assert 0 < figures["host_seconds_a_step"] <= figures["wall_seconds_a_step"]
