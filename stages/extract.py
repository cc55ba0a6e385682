"""Stage 1: run a frozen image encoder (CLIP, or the baseline's CNN) once over every image; write its HDF5
feature store."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack

import numpy as np

from pipeline import paths
from pipeline.config import Config, dump_config
from pipeline.data import SPLITS, load_splits
from pipeline.devices import best_device
from pipeline.encoders import encode_files, encoder_attrs, load_encoder
from pipeline.errors import ViclipError
from pipeline.features import write_store
from pipeline.io import write_text


def run(
    config: Config, splits: Sequence[str] = SPLITS, skip_bad_images: bool = False, encoder_name: str = paths.ENCODER
) -> str:
    started = time.perf_counter()
    skip_bad_images = skip_bad_images or config.extract.skip_bad_images
    records = load_splits(config.data)
    device = best_device()
    section = getattr(config, encoder_name)
    encoder = load_encoder(encoder_name, section, device)
    attrs = encoder_attrs(encoder_name, section)

    counts, skipped = {}, 0
    # Every split's store is renamed into place together, and only if all succeed.
    with ExitStack() as stores:
        for split in splits:
            files = [r.path for r in records[split]]
            ids = np.array([r.image_id for r in records[split]], dtype=np.int64)
            store = stores.enter_context(write_store(
                paths.store_path(config, split, encoder_name), {**attrs, "split": split, "precision": encoder.precision}, encoder.store_dtype
            ))
            bad: list[tuple[int, str]] = []
            for rows, embeddings, errors in encode_files(
                encoder, files, config.extract.batch_size, config.extract.num_workers, device, f"{encoder_name} {split}"
            ):
                if len(rows):
                    store.append(ids[rows], embeddings)
                bad += errors
            if bad and not skip_bad_images:
                listing = "; ".join(f"{files[i]} ({error})" for i, error in sorted(bad))
                raise ViclipError(
                    f"{len(bad)} bad image(s) in {split}, nothing written "
                    f"(--skip-bad-images skips them): {listing}"
                )
            store.attrs["skipped_ids"] = [int(ids[i]) for i, _ in sorted(bad)]
            store.attrs["skipped_images"] = [f"{files[i].name}: {error}" for i, error in sorted(bad)]
            counts[split], skipped = len(files) - len(bad), skipped + len(bad)
    write_text(paths.store_dir(config, encoder_name) / "params.yaml", dump_config(config))

    summary = ", ".join(f"{n} {split}" for split, n in counts.items())
    note = f", {skipped} bad skipped" if skipped else ""
    return (
        f"extract {encoder_name}: {summary} images{note} -> {paths.store_dir(config, encoder_name)} "
        f"({time.perf_counter() - started:.1f} s)"
    )
