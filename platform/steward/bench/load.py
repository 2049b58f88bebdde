"""The built-in load generator: bounded requests for a bounded time, to a local endpoint only."""

import asyncio
import time
from urllib.parse import urlparse

import aiohttp
import numpy as np

from steward.errors import RunFailed
from steward.spec.bench import LoadSpec

LOCAL = ("127.0.0.1", "localhost", "::1")


class LoadError(RunFailed):
    """The endpoint refused or failed a request during a measurement."""

    what = "benchmark failed"


async def _level(url: str, bodies: list[dict], concurrency: int, load: LoadSpec) -> dict:
    """One concurrency level: `concurrency` clients loop over `bodies` until the time or request budget is spent."""
    latencies: list[float] = []
    sent = [0]

    async def client(session: aiohttp.ClientSession, until: float) -> None:
        while sent[0] < load.max_requests and time.perf_counter() < until:
            body, sent[0] = bodies[sent[0] % len(bodies)], sent[0] + 1
            start = time.perf_counter()
            await _post(session, url, body)
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        for i in range(load.warmup_requests):  # connections open, replicas' first-call costs paid: not measured
            await _post(session, url, bodies[i % len(bodies)])
        started = time.perf_counter()
        await asyncio.gather(*(client(session, started + load.seconds) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return summarise(latencies, elapsed, concurrency)


async def _post(session: aiohttp.ClientSession, url: str, body: dict) -> None:
    async with session.post(url, json=body) as reply:
        text = await reply.read()
        if reply.status != 200:
            raise LoadError(f"{url} answered {reply.status}: {text[:300].decode(errors='replace')}")


def summarise(latencies: list[float], elapsed: float, concurrency: int) -> dict:
    """Latency percentiles (ms) and completed requests per second of one level."""
    ms = np.asarray(latencies) * 1000
    percentiles = np.percentile(ms, [50, 95, 99]) if len(ms) else [None] * 3
    return {
        "concurrency": concurrency,
        "requests": len(ms),
        "qps": len(ms) / elapsed if elapsed else 0.0,
        **{f"p{q}_ms": float(v) if v is not None else None for q, v in zip((50, 95, 99), percentiles, strict=True)},
    }


def generate(url: str, bodies: list[dict], load: LoadSpec) -> list[dict]:
    """Every concurrency level of `load` against `url`, which must be on this machine."""
    host = urlparse(url).hostname
    if host not in LOCAL:
        raise ValueError(f"the load generator only targets this machine's endpoints, not {host}")
    return [asyncio.run(_level(url, bodies, c, load)) for c in load.concurrency]
