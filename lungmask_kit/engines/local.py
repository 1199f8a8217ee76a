"""The local engine: decode pool -> model batches -> writer pool -> recorded rows, with bounded work in flight.

It knows nothing of lungs or manifests. A job hands it `steps` (read one image, predict a batch, write one
image) and a `record(rows)` callback; the Ray engine (`engines/ray.py`) drives a job's stages on a cluster.
Threads, not processes: OpenCV, the PNG codecs and torch release the GIL, forked DataLoader workers were
slower here, and calling cv2.setNumThreads() in a forked worker hung.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

from lungmask_kit.errors import LungkitError


@dataclass
class Item:
    """One image on its way through the engine. `model_input` None after reading: nothing for the model (skipped
    or failed, `row` says which). The model's step sets `prediction` (and may free `model_input`): an item with a
    prediction goes to the writers."""

    task: Any  # what the job's read step was given (e.g. a path)
    row: dict
    model_input: Any = None
    pixels: Any = None  # what the write step needs besides the prediction (the native-size image)
    prediction: Any = None
    held: int = 0  # bytes taken from the run's ByteBudget


class Steps(Protocol):
    asynchronous: bool  # predict() returns before the model has finished (a GPU): hand it the next batch first

    def read(self, task) -> Item:
        """Read, decode and prepare one image; never raises for bad input (the row says what went wrong)."""

    def predict(self, items: list[Item]) -> Callable[[], None]:
        """Start the model on the items' inputs; the returned call sets each item's `prediction` (so a GPU can
        compute one batch while the host hands the previous one to the writers)."""

    def write(self, item: Item) -> dict:
        """Post-process and write one image's outputs; its finished row. A LungkitError (output folder
        unusable) stops the run; any other exception costs this image only."""

    def failed(self, item: Item, err: Exception) -> dict:
        """The error row of an image whose write step raised unexpectedly."""


@dataclass
class EngineSettings:
    batch_size: int
    workers: int  # decode threads and writer threads, each
    max_decoded_bytes: int


class ByteBudget:
    """Decoded pixels held between decoding and writing, in bytes (thread-safe). The engine submits more decode
    work only while the bytes held plus an estimate for the decodes in progress fit the budget, so memory is
    bounded by bytes whatever --workers and --batch-size are (one image always proceeds, however large)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self.largest = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            self.held += n
            self.largest = max(self.largest, n)

    def give_back(self, n: int) -> None:
        with self._lock:
            self.held -= n

    def room_for(self, undecoded: int) -> bool:
        """Whether one more decode fits, counting each decode under way as the largest image seen so far."""
        with self._lock:
            if not self.largest:  # nothing measured yet (or only skipped images): two decodes at a time
                return undecoded < 2
            return self.held + (undecoded + 1) * self.largest <= self.limit


class _Feeder:
    """Submits decodes ahead of the model while the count and the byte budget allow."""

    def __init__(self, decoder: ThreadPoolExecutor, read: Callable[[Any], Item], tasks: Iterable,
                 budget: ByteBudget, prefetch: int):
        self.decoder, self.read, self.pending, self.budget, self.prefetch = decoder, read, iter(tasks), budget, prefetch
        self.queue: deque[Future] = deque()
        self.exhausted = False

    def fill(self, force: bool = False) -> None:
        """`force`: one decode regardless of the budget (nothing else holds memory, so one image always
        proceeds, however large)."""
        while len(self.queue) < self.prefetch and not self.exhausted:
            if not force and not self.budget.room_for(sum(not f.done() for f in self.queue)):
                return
            task = next(self.pending, None)
            if task is None:
                self.exhausted = True
                return
            self.queue.append(self.decoder.submit(self.read, task))
            force = False

    def done(self) -> bool:
        return not self.queue and self.exhausted

    def next_batch(self, batch_size: int) -> list[Item]:
        """`batch_size` images for the model plus any skipped or failed ones met on the way."""
        items: list[Item] = []
        n_model = 0
        while self.queue and n_model < batch_size:
            items.append(self.queue.popleft().result())
            n_model += items[-1].model_input is not None
            self.fill()
        return items

    def cancel(self) -> None:
        for f in self.queue:
            f.cancel()


def run_local(steps: Steps, tasks: list, settings: EngineSettings, record: Callable[[list[dict]], None],
              budget: ByteBudget, bar=None) -> None:
    """Run every task (one image each) through `steps`; `record` receives each batch's rows in order. On an
    interrupt the writes in flight finish or are dropped (the threads are joined before this returns)."""
    with ThreadPoolExecutor(settings.workers, thread_name_prefix="lungkit-decode") as decoder, \
            ThreadPoolExecutor(settings.workers, thread_name_prefix="lungkit-write") as writer:
        feeder = _Feeder(decoder, steps.read, tasks, budget, 2 * settings.batch_size + settings.workers)
        try:
            _drive(steps, feeder, writer, settings.batch_size, record, bar)
        except BaseException:
            feeder.cancel()
            raise


def _drive(steps: Steps, feeder: _Feeder, writer: ThreadPoolExecutor, batch_size: int,
           record: Callable[[list[dict]], None], bar) -> None:
    in_flight: deque[list[tuple[Item, Future | None]]] = deque()
    predicted: tuple[list[Item], Callable[[], None]] | None = None  # the model batch started last

    def hand_to_writers() -> None:
        nonlocal predicted
        if predicted is not None:
            batch, finish = predicted
            predicted = None
            finish()
            futures = {id(it): writer.submit(steps.write, it) for it in batch if it.prediction is not None}
            in_flight.append([(it, futures.get(id(it))) for it in batch])

    feeder.fill(force=True)
    while not feeder.done():
        if not feeder.queue:  # the budget is full of images being written: wait for them, then go on
            hand_to_writers()
            if in_flight:
                _flush(steps, in_flight.popleft(), record, bar)
                feeder.fill()
            else:
                feeder.fill(force=True)
            continue
        batch = feeder.next_batch(batch_size)
        to_model = [it for it in batch if it.model_input is not None]
        finish = steps.predict(to_model) if to_model else (lambda: None)
        if steps.asynchronous:
            hand_to_writers()  # the previous batch, while the GPU computes this one
            predicted = (batch, finish)
        else:
            predicted = (batch, finish)
            hand_to_writers()
        while len(in_flight) > 2:
            _flush(steps, in_flight.popleft(), record, bar)
        feeder.fill()
    hand_to_writers()
    while in_flight:
        _flush(steps, in_flight.popleft(), record, bar)


def _flush(steps: Steps, batch: list[tuple[Item, Future | None]], record: Callable[[list[dict]], None], bar) -> None:
    rows = []
    for item, fut in batch:
        row = item.row
        if fut is not None:
            try:
                row = fut.result()
            except LungkitError:
                raise
            except Exception as err:  # a bug must not cost the batch: record it on the image
                row = steps.failed(item, err)
        rows.append(row)
    record(rows)
    if bar is not None:
        bar.update(len(batch))
