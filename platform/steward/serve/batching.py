"""Dynamic batching in a replica: concurrent requests grouped into one forward pass, formed when the model is free.

A batch starts when the model is free and either `max_size` requests wait or the oldest has waited `wait_s`; it takes
every request waiting then, up to `max_size`. While a pass runs, the next requests gather behind it, so under load
each pass is as full as the queue allows. (Serve's `@serve.batch` cuts a batch `wait_s` after its first request even
while the previous pass still runs, and that batch then waits for the model at whatever size it had: passes stay
small exactly when the model is the bottleneck.)
"""

import asyncio
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from typing import Any


class Batcher:
    """Runs `run(items) -> results` (one result per item, in order) in a worker thread, one pass at a time."""

    def __init__(self, run: Callable[[list[Any]], list[Any]], max_size: int, wait_s: float) -> None:
        self.run, self.max_size, self.wait_s = run, max_size, wait_s
        self.waiting: deque[tuple[Any, asyncio.Future, float]] = deque()
        self.arrived = asyncio.Event()  # bound to the event loop that first waits on it: the replica's
        self.worker: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        """`item`'s result, from the pass it joins; the pass's exception, if it raised."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiting.append((item, future, time.monotonic()))
        self.arrived.set()
        if self.worker is None or self.worker.done():
            self.worker = loop.create_task(self._work())
        return await future

    async def _work(self) -> None:
        """Forms and runs passes for as long as requests come; ends when none waits (`submit` starts it again)."""
        while self.waiting:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(self.run, [item for item, _, _ in batch])
                answers = list(zip(batch, results, strict=True))
            except Exception as err:  # every request of the pass gets the error; the next pass runs as usual
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future, _), result in answers:
                if not future.done():  # a request cancelled meanwhile (its client left) takes no result
                    future.set_result(result)

    async def _next_batch(self) -> list[tuple[Any, asyncio.Future, float]]:
        """The requests of the next pass, once it is full or its oldest request has waited `wait_s`."""
        deadline = self.waiting[0][2] + self.wait_s
        while len(self.waiting) < self.max_size and (left := deadline - time.monotonic()) > 0:
            self.arrived.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), left)
        batch = [self.waiting.popleft() for _ in range(min(self.max_size, len(self.waiting)))]
        return [entry for entry in batch if not entry[1].cancelled()]
