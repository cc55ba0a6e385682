"""The HDF5 feature store: one file per split, one row per image.

Layout of `<split>.h5`:
  embeddings  [N, D] or [N, P, D]  features from the frozen encoder: one CLIP
                                   embedding, or a CNN's grid of P positions
  image_ids   int64 [N]            the dataset's image ids, row for row
  attributes  what produced the rows (format, the encoder's own attributes,
              embedding_dim, dtype, split) and which images were skipped as
              unreadable (skipped_ids, skipped_images); for information, the
              precision the encoder ran at (precision) and what decoded the
              JPEG files (jpeg_decoder: pillow, or torchvision on the GPU)

A store is a contract: readers name the attributes they rely on and
`open_store` refuses a file whose attributes differ. The precision and the
JPEG decoder are not among them: a store extracted on a GPU serves a CPU run
as well.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.core.errors import ViclipError
from pipeline.core.io import atomic_path
from pipeline.data.annotations import ImageRecord

FORMAT = "viclip-features/1"
JSON_ATTRS = ("skipped_ids", "skipped_images")  # lists, stored as JSON text
# HDF5 reads whole chunks, and training reads random rows: small chunks (about 64 KB, one row at least),
# so a CNN grid (about 200 KB) is one chunk and a random CLIP row costs a 64 KB read.
CHUNK_BYTES = 1 << 16


class FeatureStore:
    """An open store: its ids and attributes in memory, its rows read on demand, so a store larger than
    memory is never loaded whole. `embeddings` loads every row, for stores known to be small."""

    def __init__(self, path: Path, image_ids: np.ndarray, attrs: dict[str, Any], rows: np.ndarray | None = None):
        self.path = path
        self.image_ids = image_ids  # (N,) int64
        self.attrs = attrs
        self._rows = rows  # every row, where they were given rather than read from `path`
        self._file: h5py.File | None = None

    def _dataset(self) -> h5py.Dataset:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return self._file["embeddings"]

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def row_bytes(self) -> int:
        rows = self._rows if self._rows is not None else self._dataset()
        return int(np.prod(rows.shape[1:])) * rows.dtype.itemsize

    @property
    def embeddings(self) -> np.ndarray:
        """(N, D) or (N, P, D), float32 or float16: every row."""
        return self._rows if self._rows is not None else self._dataset()[:]

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The given rows, in that order: each distinct row read once, in file order (HDF5 reads whole chunks)."""
        if self._rows is not None:
            return self._rows[rows]
        distinct, where = np.unique(rows, return_inverse=True)
        return self._dataset()[distinct][where.reshape(-1)]

    def slices(self, rows: range, batch_size: int) -> Iterator[np.ndarray]:
        """Rows `rows` in batches of `batch_size`, read in order: memory bounded by one batch."""
        for start in range(rows.start, rows.stop, batch_size):
            stop = min(start + batch_size, rows.stop)
            yield self._rows[start:stop] if self._rows is not None else self._dataset()[start:stop]

    def positions(self, image_ids: list[int]) -> np.ndarray:
        """The row of each given image, in that order."""
        index = {int(image_id): row for row, image_id in enumerate(self.image_ids)}
        return np.array([index[image_id] for image_id in image_ids], dtype=np.int64)

    def identity(self) -> dict[str, Any]:
        """What tells this store's contents from another's without reading every row: its attributes,
        size in bytes and image ids."""
        ids = hashlib.sha256(self.image_ids.tobytes()).hexdigest()
        size = self.path.stat().st_size if self._rows is None else self._rows.nbytes
        return {"attrs": self.attrs, "bytes": size, "image_ids": ids}


class StoreWriter:
    """Streams rows into a store; see `write_store`."""

    def __init__(self, file: h5py.File, attrs: Mapping[str, Any], dtype: str):
        self._file = file
        self._dtype = dtype
        self._rows = 0
        self.attrs = dict(attrs)  # written when the store is complete; may be added to until then

    def append(self, image_ids: np.ndarray, embeddings: np.ndarray) -> None:
        """Add rows: (B,) ids and their (B, ...) features."""
        if "embeddings" not in self._file:
            # The row shape is read from the encoder's output, never assumed.
            row = embeddings.shape[1:]
            rows_per_chunk = max(1, CHUNK_BYTES // (int(np.prod(row)) * np.dtype(self._dtype).itemsize))
            self._file.create_dataset(
                "embeddings", shape=(0, *row), maxshape=(None, *row), dtype=self._dtype,
                chunks=(rows_per_chunk, *row),
            )
            self._file.create_dataset("image_ids", shape=(0,), maxshape=(None,), dtype="int64", chunks=True)
        start, self._rows = self._rows, self._rows + len(image_ids)
        for name, values in (("embeddings", embeddings), ("image_ids", image_ids)):
            self._file[name].resize(self._rows, axis=0)
            self._file[name][start:] = values


@contextmanager
def write_store(path: str | Path, attrs: Mapping[str, Any], dtype: str = "float32") -> Iterator[StoreWriter]:
    """Write a store atomically: it appears at `path` only if the block completes."""
    with atomic_path(path) as partial, h5py.File(partial, "w") as file:
        writer = StoreWriter(file, attrs, dtype)
        yield writer
        if "embeddings" not in file:
            raise ViclipError(f"{path}: no image could be encoded, nothing to store")
        file.attrs["format"] = FORMAT
        file.attrs["embedding_dim"] = file["embeddings"].shape[-1]
        file.attrs["dtype"] = dtype
        for key, value in writer.attrs.items():
            file.attrs[key] = json.dumps(value, ensure_ascii=False) if key in JSON_ATTRS else value


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def open_store(path: str | Path, expected: Mapping[str, Any]) -> FeatureStore:
    """Read a store, refusing it unless each attribute in `expected` matches."""
    path = Path(path)
    if not path.is_file():
        raise ViclipError(f"{path}: feature store not found (run `viclip extract`)")
    try:
        with h5py.File(path, "r") as file:
            # A store from before viclip read other datasets is KTVIC's, the one it read then.
            attrs = {"dataset": "KTVIC", **{key: _plain(value) for key, value in file.attrs.items()}}
            attrs.update({key: json.loads(attrs[key]) for key in JSON_ATTRS if key in attrs})
            if attrs.get("format") != FORMAT:
                raise ViclipError(f"{path}: not a viclip feature store (format {attrs.get('format')!r})")
            if "embeddings" not in file or "image_ids" not in file or len(file["embeddings"]) != len(file["image_ids"]):
                raise ViclipError(f"{path}: malformed feature store (embeddings and image_ids do not match)")
            image_ids = file["image_ids"][:]
    except OSError as error:
        raise ViclipError(f"{path}: unreadable feature store ({error})") from None
    for key, want in expected.items():
        if attrs.get(key) != want:
            raise ViclipError(
                f"{path}: store has {key}={attrs.get(key)!r} but {want!r} is expected; "
                "re-run `viclip extract` with the current params"
            )
    return FeatureStore(path, image_ids, attrs)


def stored_records(records: Sequence[ImageRecord], store: FeatureStore) -> list[ImageRecord]:
    """The split's images that have features in `store`; refused where one is absent that extract did not
    record as skipped (unreadable): the store is of other data."""
    stored = set(store.image_ids.tolist())
    skipped = set(store.attrs.get("skipped_ids", []))
    absent = [r.image_id for r in records if r.image_id not in stored and r.image_id not in skipped]
    if absent:
        raise ViclipError(
            f"{store.path}: no embedding for {len(absent)} images of the data split "
            f"(e.g. id {absent[0]}); re-run `viclip extract`"
        )
    return [r for r in records if r.image_id in stored]
