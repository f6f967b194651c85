"""Claim+ack throughput through HTTP against a running Pombo server.

    python bench/claim.py --url http://127.0.0.1:8000 --token $TOKEN --workers 8 --messages 5000

Each worker loops: claim (max=1 by default), then ack each message. Prints one table line and one
JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import time

import httpx


async def fill(http: httpx.AsyncClient, queue: str, count: int) -> None:
    assert (await http.post("/api/v1/queues", json={"name": queue})).status_code == 201
    for start in range(0, count, 1000):
        items = [{"body": {"n": n}} for n in range(start, min(start + 1000, count))]
        response = await http.post(f"/api/v1/queues/{queue}/messages/batch", json={"items": items})
        response.raise_for_status()


async def work(http: httpx.AsyncClient, queue: str, batch: int, done: list[int]) -> None:
    while True:
        response = await http.post(f"/api/v1/queues/{queue}/claim", json={"max": batch})
        response.raise_for_status()
        items = response.json()["items"]
        if not items:
            return
        for item in items:
            ack = await http.post(
                f"/api/v1/queues/{queue}/messages/{item['id']}/ack", json={"lease_id": item["lease_id"]}
            )
            ack.raise_for_status()
            done[0] += 1


async def main(args: argparse.Namespace) -> dict[str, object]:
    limits = httpx.Limits(max_connections=args.workers + 4)
    headers = {"Authorization": f"Bearer {args.token}"}
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits, timeout=60) as http:
        queue = f"bench-claim-{secrets.token_hex(3)}"
        await fill(http, queue, args.messages)
        done = [0]
        started = time.perf_counter()
        await asyncio.gather(*(work(http, queue, args.batch, done) for _ in range(args.workers)))
        elapsed = time.perf_counter() - started
    return {
        "scenario": "claim",
        "workers": args.workers,
        "batch": args.batch,
        "messages": done[0],
        "seconds": round(elapsed, 2),
        "per_second": round(done[0] / elapsed),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=os.environ.get("POMBO_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--token", default=os.environ.get("POMBO_TOKEN"))
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=1, help="max messages per claim")
    result = asyncio.run(main(parser.parse_args()))
    print(
        "claim+ack  workers={workers}  batch={batch}  {messages} in {seconds} s = {per_second}/s".format(
            **result
        )
    )
    print(json.dumps(result))
