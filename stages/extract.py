"""Stage 1: run a store's frozen image encoder (CLIP, or the baseline's CNN) once over every image; write the
HDF5 feature store. The images are encoded in chunks (pipeline.data.chunks): a killed run resumes, and under torchrun
the ranks share them; the main rank then writes the store."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack

import numpy as np

from pipeline.core import distributed, paths, registry
from pipeline.core.config import Config, dump_config
from pipeline.core.devices import best_device
from pipeline.core.errors import ViclipError
from pipeline.core.io import write_text
from pipeline.data.chunks import SplitChunks
from pipeline.data.datasets import SPLITS, load_dataset
from pipeline.data.features import write_store
from pipeline.encoders import encoder_attrs, load_encoder
from pipeline.encoders.images import jpeg_decoder

LISTED = 10  # bad images named in the error; a dataset whose images are elsewhere has thousands


def run(
    config: Config, splits: Sequence[str] = SPLITS, skip_bad_images: bool = False, store: str = registry.DEFAULT_STORE
) -> str:
    started = time.perf_counter()
    skip_bad_images = skip_bad_images or config.extract.skip_bad_images
    dataset = load_dataset(config.data)
    device = best_device()
    family, settings = registry.STORES[store].encoder, getattr(config, store)
    encoder = load_encoder(family, settings, device)
    attrs = {**encoder_attrs(family, settings), **dataset.attrs(), "precision": encoder.precision,
             "jpeg_decoder": jpeg_decoder(encoder, device)}

    encoded = []  # (split, its chunks, its bad images: (record, why))
    for split in splits:
        # An image its dataset's files name but that is not there (or is there twice) is bad before it is read.
        records = [r for r in dataset.splits[split] if r.problem is None]
        bad = [(r, r.problem) for r in dataset.splits[split] if r.problem is not None]
        ids = np.array([r.image_id for r in records], dtype=np.int64)
        chunks = SplitChunks(paths.chunk_dir(config, split, store), [r.path for r in records], ids,
                             {**attrs, "split": split}, encoder.store_dtype, config.extract.batch_size,
                             config.extract.chunk_batches)
        bad += [(records[i], error) for i, error in chunks.encode(encoder, config.extract.num_workers, device,
                                                                  f"{store} {split}")]
        if bad and not skip_bad_images:
            listing = "; ".join(f"{record.path} ({error})" for record, error in bad[:LISTED])
            listing += f"; … ({len(bad) - LISTED} more)" if len(bad) > LISTED else ""
            raise ViclipError(
                f"{len(bad)} bad image(s) in {split}, nothing written "
                f"(--skip-bad-images skips them): {listing}"
            )
        encoded.append((split, chunks, bad))
    if not distributed.is_main():  # the main rank writes the stores
        return ""

    # Every split's store is renamed into place together, and only if all succeed.
    with ExitStack() as writers:
        for split, chunks, bad in encoded:
            writer = writers.enter_context(write_store(
                paths.store_path(config, split, store), chunks.attrs, encoder.store_dtype
            ))
            for image_ids, embeddings in chunks.rows():
                writer.append(image_ids, embeddings)
            writer.attrs["skipped_ids"] = [record.image_id for record, _ in bad]
            writer.attrs["skipped_images"] = [f"{record.path.name}: {error}" for record, error in bad]
    for _, chunks, _ in encoded:
        chunks.discard()
    write_text(paths.store_dir(config, store) / "params.yaml", dump_config(config))

    summary = ", ".join(f"{len(dataset.splits[split]) - len(bad)} {split}" for split, _, bad in encoded)
    skipped = sum(len(bad) for _, _, bad in encoded)
    note = f", {skipped} bad skipped" if skipped else ""
    return (
        f"extract {store}: {dataset.name}, {summary} images{note} -> {paths.store_dir(config, store)} "
        f"({time.perf_counter() - started:.1f} s)"
    )
