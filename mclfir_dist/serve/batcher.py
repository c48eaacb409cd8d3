"""Concurrent uploads are embedded together: requests queue their prepared image, one worker takes whatever
is waiting (up to `max_batch`; `wait_ms` > 0 also waits that long for more), runs the model once in its own
thread and answers each request. While the model runs, new requests queue up, so batches grow with the load
and a lone request never waits (measured: a 3 ms wait cost 8 ms p50 at concurrency 1)."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

EmbedFn = Callable[["torch.Tensor", Sequence[str]], Dict[str, np.ndarray]]   # torch: loaded with the model


class EmbedBatcher:
    def __init__(self, embed_fn: EmbedFn, attributes: Sequence[str], max_batch: int = 32, wait_ms: float = 0.0,
                 report: Optional[Callable[[int, float, int], None]] = None):
        self.embed_fn, self.attributes, self.report = embed_fn, list(attributes), report   # report: /metrics
        self.max_batch, self.wait = max_batch, wait_ms / 1000.0
        self.queue: Optional[asyncio.Queue] = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self.task: Optional[asyncio.Task] = None
        self.batches = self.images = 0

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def embed(self, x: torch.Tensor) -> Dict[str, np.ndarray]:
        """One prepared image (C x H x W) -> {attribute: D}, batched with whatever else is waiting."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((x, future))
        return await future

    async def _take(self) -> List[Tuple[torch.Tensor, asyncio.Future]]:
        items = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + self.wait
        while len(items) < self.max_batch:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0 and self.queue.empty():
                break
            try:
                items.append(self.queue.get_nowait() if not self.queue.empty()
                             else await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return items

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._take()
            try:
                import torch
                x = torch.stack([x for x, _ in items])
                started = loop.time()
                out = await loop.run_in_executor(self.pool, self.embed_fn, x, self.attributes)
                if self.report:
                    self.report(len(items), loop.time() - started, self.queue.qsize())
            except Exception as e:   # the model failed: every waiting request gets the error, the worker lives on
                for _, f in items:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.batches += 1
            self.images += len(items)
            for i, (_, f) in enumerate(items):
                if not f.done():   # the client may have gone away
                    f.set_result({a: v[i] for a, v in out.items()})

    def stats(self) -> dict:
        return {"batches": self.batches, "images": self.images,
                "mean_batch": round(self.images / self.batches, 2) if self.batches else 0.0}
