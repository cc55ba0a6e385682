"""Atomic writes: an interrupted run never leaves an artifact that looks complete. And the one digest of a
JSON value that fingerprints are made of.

Everything is first written under a hidden ".partial" name in the destination's
own directory (so the final rename stays on one filesystem) and renamed into
place only once complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.core.errors import ViclipError


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write a file or directory to; it replaces `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial(path)
    _remove(partial)
    try:
        yield partial
    except BaseException:
        _remove(partial)
        raise
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    os.replace(partial, path)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as partial:
        partial.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def read_json(path: str | Path, hint: str = "") -> Any:
    """Parse a JSON file, failing in one line; `hint` says how a missing one is made."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ViclipError(f"{path}: no such file" + (f" ({hint})" if hint else "")) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ViclipError(f"{path}: not valid JSON ({error})") from None


def json_digest(value: Any) -> str:
    """The sha256 (hex) of a JSON value, its keys sorted: equal values, equal digests."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
