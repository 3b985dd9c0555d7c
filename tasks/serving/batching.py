"""Dynamic micro-batching: feature matrices of requests that arrive together go through ONE forward pass.

Each request transforms its own records (so an invalid record fails only its request) and submits the matrix. The
first submission to an empty queue schedules a flush with ``loop.call_soon``: every request the event loop already
has in hand (their handlers run before that callback) joins the batch, and a lone request waits for nobody, so
batching adds no latency at concurrency 1. A positive ``max_wait_s`` trades latency for larger batches instead.

The forward pass runs inline on the event loop thread. The server serves on one core; handing a small model's
forward pass (tens of microseconds) to a worker thread costs more in wake-ups and GIL hand-overs than the pass
itself, and the loop has nothing else to do meanwhile that the batch would not delay anyway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)


class MicroBatcher:
    """Queues feature matrices and answers each with its slice of one batched prediction.

    Args:
        predict: the forward pass, ``[n, d]`` float32 features to an array whose first axis has ``n`` rows.
        max_batch: the most rows per forward pass; a matrix larger than this is refused by :meth:`submit`.
        max_wait_s: how long the first queued request waits for others (0: flush as soon as the loop is idle).
        on_batch: called with the number of rows of every forward pass (e.g. a histogram's ``observe``).
    """

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], max_batch: int, max_wait_s: float = 0.0,
                 on_batch: Callable[[int], None] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, found {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0 seconds, found {max_wait_s}")
        self._predict = predict
        self.max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._queue: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = []
        self._rows = 0
        self._handle: asyncio.Handle | None = None
        self._flush_now = False

    def submit(self, x: np.ndarray) -> asyncio.Future[np.ndarray]:
        """Queue ``x`` (``[n, d]``, ``1 <= n <= max_batch``) for the next forward pass.

        Must be called on the event loop thread.

        Returns:
            A future of the prediction rows of ``x``; it raises what the forward pass raised.

        Raises:
            ValueError: ``x`` has no rows or more than ``max_batch``.
        """
        n = len(x)
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"a request must hold 1 to {self.max_batch} rows, found {n}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._queue.append((x, future))
        self._rows += n
        if self._rows >= self.max_batch and not self._flush_now:
            # A full batch goes now, whatever the wait.
            if self._handle is not None:
                self._handle.cancel()
            self._handle = loop.call_soon(self._flush)
            self._flush_now = True
        elif self._handle is None:
            self._flush_now = self._max_wait_s == 0
            self._handle = (loop.call_soon(self._flush) if self._flush_now
                            else loop.call_later(self._max_wait_s, self._flush))
        return future

    @property
    def pending_rows(self) -> int:
        """Rows queued and not yet predicted."""
        return self._rows

    def _take(self) -> list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]:
        """Pop queued requests totalling at most ``max_batch`` rows (always at least one request)."""
        rows, count = 0, 0
        for x, _ in self._queue:
            if count and rows + len(x) > self.max_batch:
                break
            rows += len(x)
            count += 1
        taken, self._queue = self._queue[:count], self._queue[count:]
        self._rows -= rows
        return taken

    def _flush(self) -> None:
        self._handle = None
        self._flush_now = False
        batch = self._take()
        if self._queue:  # the rest goes in the next pass, after the loop has run the handlers just answered
            self._handle = asyncio.get_running_loop().call_soon(self._flush)
            self._flush_now = True
        live = [(x, f) for x, f in batch if not f.done()]  # a cancelled request (client gone) is not predicted
        if not live:
            return
        try:
            features = live[0][0] if len(live) == 1 else np.concatenate([x for x, _ in live])
            y = self._predict(features)  # inline on the event loop thread: see the module docstring
            if len(y) != len(features):
                raise ValueError(f"the model returned {len(y)} rows for {len(features)} input rows")
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the failure; nothing is swallowed
            for _, future in live:
                future.set_exception(exc)
            return
        if self._on_batch is not None:
            self._on_batch(len(features))
        start = 0
        for x, future in live:
            future.set_result(y[start:start + len(x)])
            start += len(x)
