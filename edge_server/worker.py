"""The single model worker: every forward pass runs on one thread, in arrival order.

The asyncio gRPC loop never blocks on torch; sessions await their turn here, and the time
spent waiting is reported to the device as queue time.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


class ModelWorker:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgespec-model")

    async def run(self, fn: Callable[[], T]) -> tuple[T, float]:
        """Runs fn on the model thread; returns its result and the ms it waited in the queue."""
        queued = time.perf_counter()
        waited: list[float] = []

        def timed() -> T:
            waited.append((time.perf_counter() - queued) * 1e3)
            return fn()

        result = await asyncio.get_running_loop().run_in_executor(self._executor, timed)
        return result, waited[0]

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
