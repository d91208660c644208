"""Micro-batches prepared in a background thread while the GPU runs the step before them.

The data loader's work (the processor on images and text, collation; or waiting for its worker processes)
then overlaps the training step instead of running between steps. The order of the batches is the loader's;
nothing here draws random numbers, so a resumed run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import queue
import threading

import torch

_END = object()


def pin(batch: dict) -> dict:
    """The batch with its tensors in page-locked memory (copies to the GPU can then run asynchronously)."""
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _produce(source, out: queue.Queue, stop: threading.Event, pin_memory: bool) -> None:
    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for batch in source:
            if not put(pin(batch) if pin_memory else batch):
                return
        put(_END)
    except BaseException as error:  # noqa: BLE001  (handed to the consumer, raised there)
        put(error)


class Prefetcher:
    """Iterates `loader` up to `depth` batches ahead in a daemon thread.

    The loader's iterator is made here, in the calling thread (so that data-loader worker processes start
    from it); errors raised while loading are raised by `next`. The thread stops when the prefetcher is
    closed or garbage-collected (an abandoned epoch leaves no thread waiting).

    Args:
        loader: an iterable of batch dicts (a `torch.utils.data.DataLoader`).
        depth: batches kept ready. pin_memory: pin their tensors (for non-blocking copies to a GPU).
    """

    def __init__(self, loader, depth: int = 2, pin_memory: bool = False):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        # the thread holds the queue, the event and the iterator, not `self`: dropping the prefetcher closes it
        self._thread = threading.Thread(
            target=_produce,
            args=(iter(loader), self._queue, self._stop, pin_memory),
            name="specvlm-prefetch",
            daemon=True,
        )
        self._thread.start()
        self._done = False

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def close(self, timeout: float = 10.0) -> None:
        """Stops the thread and waits for it (up to `timeout` seconds: it checks the stop flag between batches),
        so that no loading is left running when the process moves on or exits."""
        self._stop.set()
        self._done = True
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __del__(self):
        self._stop.set()
