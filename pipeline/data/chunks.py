"""Extraction in chunks: a killed run resumes from its last whole chunk, and torchrun ranks share the work.

A split's images are cut into chunks of `extract.chunk_batches` whole batches, so the batches, and hence
the numbers, are those of one process encoding the split in one go. Each finished chunk is a small HDF5
file, renamed into place only when complete (a kill leaves a hidden .partial, never a chunk), in a work
folder outside the store's folder, which DVC deletes before it runs the stage:

  <work folder>/<settings>/<index>.h5
    embeddings   [n, ...]   the chunk's encodable images, in split order (absent when there are none)
    image_ids    int64 [n]
    bad_rows     int64 [k]  where in the split the chunk's bad images are; their errors in bad_errors
    attributes   format, fingerprint, index, rows (n), bad_errors, the store's attributes (for
                 information), rank (the process that encoded it)

<settings> is a digest of what decides every chunk: the store's attributes (encoder, weights, precision,
split), the store dtype, the split's files and image ids, the batch and chunk sizes. A chunk's fingerprint
adds the size and modification time of each of its files, so an image replaced after a kill is encoded
again. A chunk that does not match, or cannot be read, is never trusted: it is removed and encoded again.

Under torchrun the main rank checks which chunks are done, rank r encodes the pending chunks r, r+N, ...,
and once every rank has finished, the main rank assembles the store in split order: the same store as one
process writes. So every rank must see the work folder (one machine, or a shared filesystem).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from math import ceil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from pipeline.core import distributed
from pipeline.core.errors import ViclipError
from pipeline.core.io import atomic_path, json_digest
from pipeline.data.features import StoreWriter
from pipeline.encoders.base import ImageEncoder
from pipeline.encoders.images import encode_files

FORMAT = "viclip-chunk/1"
Bad = tuple[int, str]  # a bad image: its position in the split, and why


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        status = path.stat()
    except OSError:
        return None  # missing or unreadable: a bad image, until it is there
    return status.st_size, status.st_mtime_ns


@dataclass(frozen=True)
class Chunk:
    index: int
    start: int  # the split's images start:stop
    stop: int
    path: Path


class _Untrusted(Exception):
    """A chunk file that does not hold what this run would have written."""


class SplitChunks:
    """One split's chunks under `folder` (paths.chunk_dir): what is done, encoding the rest, the rows."""

    def __init__(
        self, folder: Path, files: Sequence[Path], ids: np.ndarray, attrs: Mapping[str, Any], dtype: str,
        batch_size: int, chunk_batches: int,
    ):
        self.folder = Path(folder)
        self.files, self.ids, self.attrs, self.dtype = list(files), ids, dict(attrs), dtype
        self.batch_size = batch_size
        size = batch_size * chunk_batches
        self.settings = json_digest({
            "format": FORMAT, "attrs": self.attrs, "dtype": dtype, "files": [str(f) for f in self.files],
            "ids": ids.tolist(), "batch_size": batch_size, "chunk_size": size,
        })[:16]
        self.chunks = [
            Chunk(index, start, min(start + size, len(self.files)), self.folder / self.settings / f"{index:06d}.h5")
            for index, start in enumerate(range(0, len(self.files), size))
        ]

    def fingerprint(self, chunk: Chunk) -> str:
        """The settings, and the chunk's files as they are on disk now."""
        return json_digest([self.settings, [_stat(path) for path in self.files[chunk.start:chunk.stop]]])[:16]

    def encode(self, encoder: ImageEncoder, num_workers: int, device: torch.device, label: str) -> list[Bad]:
        """Encode the chunks not yet done, shared out across ranks; every rank returns the split's bad images,
        in split order."""
        pending, done_bad = distributed.gather(self._check() if distributed.is_main() else None)[0]
        if distributed.is_main() and len(pending) < len(self.chunks):
            done = len(self.chunks) - len(pending)
            print(f"extract {label}: resuming, {done} of {len(self.chunks)} chunks already done", flush=True)
        bad = self._encode(pending[distributed.rank()::distributed.world_size()], encoder, num_workers, device, label)
        # Every rank waits here until all chunks are written.
        everyone = distributed.gather(bad + (done_bad if distributed.is_main() else []))
        return sorted(b for rank_bad in everyone for b in rank_bad)

    def rows(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, embeddings) of every encoded image in split order, a batch at a time, from the chunks."""
        for chunk in self.chunks:
            try:
                ids, _ = self._read(chunk)
                with h5py.File(chunk.path, "r") as file:
                    for start in range(0, len(ids), self.batch_size):
                        yield ids[start:start + self.batch_size], file["embeddings"][start:start + self.batch_size]
            except (_Untrusted, OSError) as error:
                raise ViclipError(
                    f"{chunk.path}: chunk missing or not as written ({error}); every rank must see "
                    f"{self.folder} (one machine, or a shared filesystem)"
                ) from None

    def discard(self) -> None:
        """Remove the split's work folder, and the folders above it (.chunks/<store>, .chunks) once empty."""
        shutil.rmtree(self.folder, ignore_errors=True)
        for parent in self.folder.parents[:2]:
            try:
                parent.rmdir()
            except OSError:
                break

    def _check(self) -> tuple[list[Chunk], list[Bad]]:
        """The chunks still to encode, and the bad images of those done. Chunks from other settings, and any
        that cannot be trusted, are removed."""
        if self.folder.is_dir():
            for other in self.folder.iterdir():
                if other.name != self.settings and other.is_dir():
                    shutil.rmtree(other)
        pending, bad = [], []
        for chunk in self.chunks:
            try:
                bad += self._read(chunk)[1]
            except (_Untrusted, OSError):
                chunk.path.unlink(missing_ok=True)
                pending.append(chunk)
        return pending, bad

    def _read(self, chunk: Chunk) -> tuple[np.ndarray, list[Bad]]:
        """A chunk file's image ids and bad images, once it is shown to be the one this run would write."""
        try:
            with h5py.File(chunk.path, "r") as file:
                attrs = file.attrs
                if attrs.get("format") != FORMAT or attrs.get("fingerprint") != self.fingerprint(chunk) \
                        or attrs.get("index") != chunk.index:
                    raise _Untrusted("written for other settings or files")
                ids = file["image_ids"][:] if "image_ids" in file else np.zeros(0, np.int64)
                bad_rows = file["bad_rows"][:].tolist()
                errors = json.loads(attrs["bad_errors"])
                rows = [file["embeddings"].shape[0] if "embeddings" in file else 0, len(ids), attrs["rows"]]
                dtype = file["embeddings"].dtype if "embeddings" in file else np.dtype(self.dtype)
        except (KeyError, ValueError, TypeError) as error:
            raise _Untrusted(f"incomplete ({error})") from None
        good = sorted(set(range(chunk.start, chunk.stop)) - set(bad_rows))  # the rows that were encoded
        whole = len(good) + len(bad_rows) == chunk.stop - chunk.start and len(errors) == len(bad_rows)
        if not (whole and rows == [len(good)] * 3 and dtype == np.dtype(self.dtype)
                and np.array_equal(ids, self.ids[good])):
            raise _Untrusted("rows that do not match the split")
        return ids, list(zip(bad_rows, errors))

    def _encode(
        self, chunks: list[Chunk], encoder: ImageEncoder, num_workers: int, device: torch.device, label: str
    ) -> list[Bad]:
        """Encode `chunks` through one loader (one progress bar, no pause between chunks), writing each as it
        completes. Each chunk is whole batches but the split's last, which comes last here too, so the loader's
        batches are those of the whole split."""
        if not chunks:
            return []
        rows = np.concatenate([np.arange(chunk.start, chunk.stop) for chunk in chunks])  # split rows, in loader order
        # The files as they are before the loader reads them: one replaced meanwhile is not taken for the one read.
        fingerprints = [self.fingerprint(chunk) for chunk in chunks]
        bad: list[Bad] = []
        batches = encode_files(encoder, [self.files[row] for row in rows], self.batch_size, num_workers, device, label)
        with closing(batches):
            for chunk, fingerprint in zip(chunks, fingerprints):
                with atomic_path(chunk.path) as partial, h5py.File(partial, "w") as file:
                    writer, errors = StoreWriter(file, {}, self.dtype), []
                    for _ in range(ceil((chunk.stop - chunk.start) / self.batch_size)):
                        positions, embeddings, failed = next(batches)
                        if len(positions):
                            writer.append(self.ids[rows[positions]], embeddings)
                        errors += [(int(rows[position]), error) for position, error in failed]
                    errors.sort()
                    file["bad_rows"] = np.array([row for row, _ in errors], dtype=np.int64)
                    file.attrs.update({
                        "format": FORMAT, "fingerprint": fingerprint, "index": chunk.index,
                        "rows": chunk.stop - chunk.start - len(errors),
                        "bad_errors": json.dumps([error for _, error in errors], ensure_ascii=False),
                        "store_attrs": json.dumps(self.attrs, ensure_ascii=False), "rank": distributed.rank(),
                    })
                bad += errors
        return bad
