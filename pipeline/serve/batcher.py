"""Micro-batching: requests that arrive close together are decoded together, one model call at a time.

A request's images for one model become a job. One worker thread per device takes the oldest job,
waits up to `window_s` after it arrived for more jobs with the same model and decoding settings, and
runs them as one batch: one encoder call, one batched beam search. Jobs that wait while the worker is
busy have already waited longer than the window, so under load every call takes all that is ready
(up to `max_batch` images) without waiting at all. The queue holds at most `max_queue` images; a job
that would overflow it is refused at once (`QueueFull`), so a flood is answered rather than piled up.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from pipeline.core.config import ScoreConfig
from pipeline.decoding.inference import LoadedModel


class QueueFull(Exception):
    """More images are waiting than the queue holds."""


@dataclass(frozen=True)
class JobCaptions:
    """One job's captions, and where its time went."""

    texts: list[str]
    queued_s: float  # from submission to the start of its model call
    model_s: float  # the model call (encoder and beam search) that decoded it, shared with its batch
    batch_images: int  # images in that call, this job's and the others'


@dataclass
class _Job:
    model: str
    pixels: torch.Tensor  # (k, 3, H, W) uint8
    settings: ScoreConfig
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple:
        """Jobs batch together only when the same model decodes them the same way."""
        return self.model, self.settings.beam_size, self.settings.max_length, self.settings.length_penalty


class MicroBatcher:
    """Queues jobs for the models on one device, and runs them in batches on one worker thread."""

    def __init__(self, models: dict[str, LoadedModel], window_s: float, max_batch: int, max_queue: int):
        self.models = models
        self.window_s = window_s
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._jobs: deque[_Job] = deque()
        self._queued = 0  # images in self._jobs
        self._changed = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="viclip-batcher", daemon=True)
        self._worker.start()

    def submit(self, model: str, pixels: torch.Tensor, settings: ScoreConfig) -> Future:
        """Queue (k, 3, H, W) pixels for `model`; the future gives its `JobCaptions`. Raises QueueFull at once."""
        job = _Job(model, pixels, settings)
        with self._changed:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if self._queued + len(pixels) > self.max_queue:
                raise QueueFull(f"{self._queued} images are waiting (the queue holds {self.max_queue})")
            self._jobs.append(job)
            self._queued += len(pixels)
            self._changed.notify()
        return job.future

    def close(self) -> None:
        """Finish what is queued, then stop the worker."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._worker.join()

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _ready(self, key: tuple) -> int:
        return sum(len(job.pixels) for job in self._jobs if job.key == key)

    def _next_batch(self) -> list[_Job] | None:
        with self._changed:
            while not self._jobs:
                if self._closed:
                    return None
                self._changed.wait()
            first = self._jobs[0]
            deadline = first.submitted + self.window_s
            while not self._closed and self._ready(first.key) < self.max_batch:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._changed.wait(left)
            # The oldest job always goes (even one larger than max_batch); others join while they fit.
            batch, size = [], 0
            for job in list(self._jobs):
                if job.key == first.key and (not batch or size + len(job.pixels) <= self.max_batch):
                    batch.append(job)
                    size += len(job.pixels)
                    self._jobs.remove(job)
            self._queued -= size
            return batch

    def _run(self, batch: list[_Job]) -> None:
        first = batch[0]
        pixels = torch.cat([job.pixels for job in batch])
        # One beam search over the whole batch, however many images score.batch_size would allow.
        settings = first.settings.model_copy(update={"batch_size": len(pixels)})
        start = time.perf_counter()
        try:
            texts = self.models[first.model].caption_pixels(pixels, settings).texts
        except Exception as error:  # noqa: BLE001  (every waiting request learns of it; the worker lives on)
            for job in batch:
                job.future.set_exception(error)
            return
        seconds = time.perf_counter() - start
        offset = 0
        for job in batch:
            count = len(job.pixels)
            job.future.set_result(JobCaptions(texts[offset:offset + count], start - job.submitted, seconds, len(pixels)))
            offset += count
