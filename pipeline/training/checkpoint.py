"""Crash, then resume: the whole training state at the end of each epoch, in one file outside the DVC output.

DVC deletes a stage's outputs before it runs the stage, so the file lives beside the model directory, not
in it (`paths.checkpoint_path`). It holds what is trained, the best epoch's weights so far, the optimiser,
scheduler and gradient scaler, every random generator of every rank and the shuffle generator, the
epoch and log so far, and a fingerprint of the settings, data and code it belongs to (the code the
training process has loaded). A run whose fingerprint differs ignores it (and says so). It is written atomically, and removed once the model
directory is written.

It is loaded with `torch.load(weights_only=True)`, which rebuilds tensors and plain Python values and
runs no pickled code: everything saved here is one of those. The random generators it saves are
seeded here too (`seed_everything`), at the start of a run.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import pipeline
from pipeline.core.io import atomic_path

FORMAT = "viclip-resume/1"


def code_digest() -> str:
    """A digest of the viclip source this process has loaded (modules of pipeline/ and stages/): a checkpoint
    belongs to the code that wrote it. Code a training run never loads (the service, the report) is not
    in it, so editing that code keeps a half-finished run."""
    root = Path(pipeline.__file__).resolve().parent.parent
    packages = (root / "pipeline", root / "stages")
    loaded = {Path(module.__file__).resolve() for module in list(sys.modules.values())
              if getattr(module, "__file__", None)}
    digest = hashlib.sha256()
    for path in sorted(p for p in loaded if p.suffix == ".py" and any(p.is_relative_to(d) for d in packages)):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def fingerprint(settings: dict[str, Any]) -> str:
    """What a checkpoint must match to be resumed: `settings` (JSON-able), the code, torch's version."""
    text = json.dumps({**settings, "code": code_digest(), "torch": torch.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every random generator this process draws from, as tensors and plain values."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, fingerprint: str, state: dict[str, Any]) -> None:
    with atomic_path(path) as partial:
        torch.save({"format": FORMAT, "fingerprint": fingerprint, **state}, partial)


def load(path: Path, fingerprint: str) -> tuple[dict[str, Any] | None, str | None]:
    """The state saved at `path` if it belongs to this run, and a line saying why one was set aside."""
    if not path.is_file():
        return None, None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a file from another torch, or not a checkpoint at all: never trusted
        return None, f"{path}: unreadable checkpoint ignored ({str(error).splitlines()[0]}); starting afresh"
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return None, f"{path}: not a viclip checkpoint, ignored; starting afresh"
    if state["fingerprint"] != fingerprint:
        return None, f"{path}: checkpoint of other settings, data or code, ignored; starting afresh"
    return state, None
