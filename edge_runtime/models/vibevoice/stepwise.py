"""Run a call that produces chunks through a callback (transformers' generate() decoding frame by
frame) as a generator: the call runs in a worker thread that pauses at every chunk until the
consumer asks for the next one. So the model computes only while the consumer is inside next(),
under the locks and inference mode the caller holds there (the runtime's one-forward-at-a-time
lock keeps meaning what it says), and closing the generator stops the call at its next chunk.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch


class _Cancelled(BaseException):
    """Raised inside the worker at its next chunk once the consumer stopped listening."""


def stepwise(work: Callable[[Callable[[Any], None]], Any], name: str = "edge-stepwise") -> Iterator[Any]:
    """Yield what ``work(emit)`` passes to ``emit``, one item per next(); ``work`` runs in a thread,
    paused inside emit() while the consumer holds an item. Exceptions of ``work`` re-raise here."""
    handoff: queue.Queue = queue.Queue(maxsize=1)
    resume = threading.Semaphore(0)
    cancelled = threading.Event()
    inference = torch.is_inference_mode_enabled()  # the consumer's mode at the first next()
    grad = torch.is_grad_enabled()

    def emit(item: Any) -> None:
        handoff.put(("item", item))
        resume.acquire()
        if cancelled.is_set():
            raise _Cancelled

    def run() -> None:
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                work(emit)
            handoff.put(("done", None))
        except _Cancelled:
            handoff.put(("done", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            handoff.put(("error", exc))

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    try:
        while True:
            kind, value = handoff.get()
            if kind == "item":
                yield value
                resume.release()
            elif kind == "error":
                raise value
            else:
                return
    finally:
        if worker.is_alive():
            cancelled.set()
            resume.release()
            while worker.is_alive():  # let it reach its next emit (or its end), draining what it sends
                try:
                    handoff.get(timeout=0.05)
                    resume.release()
                except queue.Empty:
                    pass
            worker.join()
