"""HTTP layer: client CPU per request and requests/s against the simulated API.

    python bench/http_bench.py                  # the client as extract uses it
    python bench/http_bench.py --old REV        # and, side by side, ApiSession from git REV

The sandbox runs in its own process on 127.0.0.1 (no latency), so the CPU measured
(this process's) is the client's alone. ``concurrency`` workers GET stages pages and
read their bodies; with a server limit, request starts are paced by the extractor's
rate controller (--max-rps 195), as in a real run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from pipeline.config import Settings  # noqa: E402
from pipeline.http import api_client, read_body  # noqa: E402
from pipeline.rate import AdaptiveRate  # noqa: E402
from pipeline.sandbox import SandboxProcess  # noqa: E402

KEY = "bench-key"
Opener = Callable[[Settings], contextlib.AbstractAsyncContextManager[Callable[[str], Any]]]


@contextlib.asynccontextmanager
async def async_client(settings: Settings) -> AsyncIterator[Callable[[str], Any]]:
    """What extract uses: api_client with its SpreadTransport."""
    async with api_client(settings, KEY) as client:
        yield lambda url: client.stream("GET", url)


@contextlib.asynccontextmanager
async def one_pool_client(settings: Settings) -> AsyncIterator[Callable[[str], Any]]:
    """api_client over httpx's own single pool of ``concurrency`` connections."""
    n = settings.concurrency
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    pool = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
    async with api_client(settings, KEY, pool) as client:
        yield lambda url: client.stream("GET", url)


def old_session(rev: str) -> Opener | None:
    """ApiSession as it was at git ``rev`` (None if that revision has none)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:pipeline/http.py"], capture_output=True, text=True)
    if source.returncode != 0 or "class ApiSession" not in source.stdout:
        return None
    spec = importlib.util.spec_from_loader("pipeline._http_old", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    exec(compile(source.stdout, f"{rev}:pipeline/http.py", "exec"), module.__dict__)  # noqa: S102 - our own history

    @contextlib.asynccontextmanager
    async def opener(settings: Settings) -> AsyncIterator[Callable[[str], Any]]:
        async with module.ApiSession(settings, KEY, pools=settings.concurrency) as session:
            yield session.stream

    return opener


async def drive(open_client: Opener, settings: Settings, urls: list[str], paced: bool) -> tuple[int, int]:
    """GET every URL with ``settings.concurrency`` workers; returns (answers, 429s)."""
    rate = AdaptiveRate(settings.max_rps) if paced else None
    pending = iter(urls)
    counts = {"answers": 0, "throttled": 0}

    async def worker(get: Callable[[str], Any]) -> None:
        for url in pending:
            if rate is not None:
                await rate.acquire()
            started = time.monotonic()
            async with get(url) as response:
                await read_body(response, settings.max_response_bytes)
            counts["answers"] += 1
            if response.status_code == 429:
                counts["throttled"] += 1
                if rate is not None:
                    rate.throttled(started, 1.0)
            elif rate is not None:
                rate.admitted()

    async with open_client(settings) as get:
        await asyncio.gather(*(worker(get) for _ in range(settings.concurrency)))
    return counts["answers"], counts["throttled"]


def measure(name: str, open_client: Opener, limit: float | None, requests: int, concurrency: int) -> dict[str, Any]:
    with SandboxProcess(n_calls=200, seed=1, api_key=KEY, rate_limit_rps=limit) as box:
        settings = Settings(base_url=box.base_url, concurrency=concurrency, max_rps=195, page_size=100)
        base = box.base_url.rstrip("/")
        urls = [f"{base}/api/calls/{box.call_ids[i % len(box.call_ids)]}/stages?pageSize=100" for i in range(requests)]
        asyncio.run(drive(open_client, settings, urls[: concurrency * 4], paced=False))  # warm-up: imports
        cpu, wall = time.process_time(), time.monotonic()
        answers, throttled = asyncio.run(drive(open_client, settings, urls, paced=limit is not None))
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    return {
        "client": name,
        "server limit": f"{limit:.0f} req/s" if limit else "unlimited",
        "req/s": f"{answers / wall:,.0f}",
        "CPU ms/request": f"{1000 * cpu / answers:.3f}",
        "429s": f"{throttled}/{answers}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--old", metavar="REV", help="also measure ApiSession from this git revision (e.g. HEAD)")
    args = parser.parse_args()
    clients: list[tuple[str, Opener]] = [
        ("AsyncClient + SpreadTransport", async_client),
        ("AsyncClient, one httpx pool", one_pool_client),
    ]
    if args.old:
        opener = old_session(args.old)
        if opener is None:
            print(f"{args.old}: no ApiSession in pipeline/http.py; not measured", file=sys.stderr)
        else:
            clients.append((f"ApiSession ({args.old})", opener))
    rows = [
        measure(name, opener, limit, args.requests, args.concurrency)
        for limit in (None, 200.0)
        for name, opener in clients
    ]
    columns = list(rows[0])
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(row[c].ljust(w) for c, w in zip(columns, widths)))


if __name__ == "__main__":
    main()
