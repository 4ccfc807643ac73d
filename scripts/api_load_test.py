#!/usr/bin/env python3
"""Load test for `llmtune api`: continuous batching vs one sequence at a time.

In one invocation it starts the server twice on the same model, first with
`--max_batch <N>` (continuous batching), then with `--max_batch 1` (serialised), and runs
the same kind of load against each: C concurrent clients (asyncio + httpx), each sending R
chat completions in turn with a short max_tokens, streamed or not; every 4th client drops
its stream after a few chunks on every other request (the server must cancel those and keep
serving). It counts errors (any non-200, a stream without finish_reason / usage / [DONE], a
malformed body), samples the server's RSS every 0.25 s (`--passes N` repeats the batched load on
the same server to show RSS levels off), and reports completions/s and
completion tokens/s for both runs and their ratio.

    LLMTUNE_HOME=/tmp/llmtune-home /work/venv-openai/bin/python scripts/api_load_test.py
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(__file__))
from serve_util import Server  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Explain what a neural network is in one sentence.",
    "Write a haiku about the sea.",
    "How do I boil an egg?",
    "What is 17 times 3?",
    "Name a famous painter.",
    "Why is the sky blue?",
]


class Tally:
    def __init__(self):
        self.ok = 0
        self.dropped = 0
        self.errors = []
        self.tokens = 0
        self.latencies = []


async def one_request(client, base, i, j, drop, max_tokens, tally):
    q = QUESTIONS[(i * 7 + j) % len(QUESTIONS)]
    body = {
        "messages": [{"role": "user", "content": q}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": i * 1000 + j,
    }
    stream = drop or (i + j) % 2 == 0
    body["stream"] = stream
    t0 = time.perf_counter()
    try:
        if not stream:
            r = await client.post(base + "/v1/chat/completions", json=body)
            if r.status_code != 200:
                tally.errors.append(f"client {i} req {j}: HTTP {r.status_code} {r.text[:200]}")
                return
            v = r.json()
            u = v["usage"]
            assert v["choices"][0]["finish_reason"] in ("stop", "length"), v
            assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"], u
            tally.tokens += u["completion_tokens"]
        else:
            async with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    tally.errors.append(f"client {i} req {j}: HTTP {r.status_code}")
                    return
                chunks, finish, usage, done = 0, None, None, False
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    c = json.loads(data)
                    if "error" in c:
                        raise AssertionError(c["error"])
                    chunks += 1
                    if c.get("usage"):
                        usage = c["usage"]
                    for ch in c["choices"]:
                        if ch.get("finish_reason"):
                            finish = ch["finish_reason"]
                    if drop and chunks >= 3:
                        tally.dropped += 1
                        return  # leaves the block: the connection is closed mid-stream
                assert done and finish in ("stop", "length") and usage, (done, finish, usage)
                tally.tokens += usage["completion_tokens"]
        tally.ok += 1
        tally.latencies.append(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        tally.errors.append(f"client {i} req {j}: {type(e).__name__}: {e}")


async def client_task(base, i, requests, max_tokens, tally):
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        for j in range(requests):
            drop = i % 4 == 3 and j % 2 == 1
            await one_request(client, base, i, j, drop, max_tokens, tally)


async def sample_rss(srv, out, stop):
    t0 = time.perf_counter()
    while not stop.is_set():
        out.append((time.perf_counter() - t0, srv.rss_kib()))
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except asyncio.TimeoutError:
            pass


async def run_load(srv, clients, requests, max_tokens):
    tally = Tally()
    rss = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(srv, rss, stop))
    t0 = time.perf_counter()
    await asyncio.gather(*(client_task(srv.base, i, requests, max_tokens, tally) for i in range(clients)))
    wall = time.perf_counter() - t0
    stop.set()
    await sampler
    async with httpx.AsyncClient() as c:
        stats = (await c.get(srv.base + "/stats")).json()
    return tally, wall, rss, stats


def rss_deciles(rss):
    """Mean RSS (MiB) over each tenth of the run."""
    mib = [k / 1024 for _, k in rss]
    n = len(mib)
    return [round(statistics.mean(mib[int(i * n / 10) : max(int((i + 1) * n / 10), int(i * n / 10) + 1)]), 1) for i in range(10)]


def rss_summary(rss):
    mib = [k / 1024 for _, k in rss]
    n = len(mib)
    q = lambda a, b: mib[int(a * n) : max(int(b * n), int(a * n) + 1)]  # noqa: E731
    first, last = q(0.0, 0.1), q(0.9, 1.0)
    return {
        "samples": n,
        "first_10pct_mean_mib": round(statistics.mean(first), 1),
        "last_10pct_mean_mib": round(statistics.mean(last), 1),
        "max_mib": round(max(mib), 1),
        "min_mib": round(min(mib), 1),
    }


def report(name, clients, requests, tally, wall, rss, stats):
    total = clients * requests
    print(f"\n== {name}: {clients} clients x {requests} requests = {total}")
    print(f"   wall {wall:.1f} s; completed {tally.ok}, dropped mid-stream {tally.dropped}, errors {len(tally.errors)}")
    for e in tally.errors[:10]:
        print("   ERROR", e)
    cps = tally.ok / wall
    tps = tally.tokens / wall
    lat = sorted(tally.latencies)
    p50 = lat[len(lat) // 2] if lat else float("nan")
    p95 = lat[int(len(lat) * 0.95)] if lat else float("nan")
    print(f"   {cps:.2f} completions/s, {tps:.1f} completion tokens/s (completed requests), latency p50 {p50:.2f} s p95 {p95:.2f} s")
    print(f"   server stats: {stats}")
    print(f"   server RSS: {rss_summary(rss)}")
    print(f"   server RSS by tenths of the run (MiB): {rss_deciles(rss)}")
    return cps, tps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_name_or_path", default="smollm2-135m")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=20, help="requests per client (batched run)")
    ap.add_argument("--serial_requests", type=int, default=None,
                    help="requests per client in the --max_batch 1 run (default: --requests)")
    ap.add_argument("--max_tokens", type=int, default=16)
    ap.add_argument("--max_batch", type=int, default=32)
    ap.add_argument("--passes", type=int, default=1,
                    help="run the batched load this many times on the same server (RSS must not keep growing)")
    ap.add_argument("--skip_serial", action="store_true", help="only the batched run")
    a = ap.parse_args()
    serial_requests = a.serial_requests or a.requests

    results = {}
    runs = [("batched", a.max_batch, a.requests, a.passes)]
    if not a.skip_serial:
        runs.append(("serialised", 1, serial_requests, 1))
    errors = 0
    for name, mb, reqs, passes in runs:
        with Server(["--model_name_or_path", a.model_name_or_path, "--max_batch", str(mb)]) as srv:
            print(f"server {srv.bin} --max_batch {mb} at {srv.base}, RSS at start {srv.rss_kib() / 1024:.1f} MiB")
            # Warm up (page in the weights) before measuring.
            asyncio.run(run_load(srv, 2, 1, a.max_tokens))
            for k in range(passes):
                tally, wall, rss, stats = asyncio.run(run_load(srv, a.clients, reqs, a.max_tokens))
                label = f"{name} (--max_batch {mb})" + (f", pass {k + 1}/{passes}" if passes > 1 else "")
                cps, tps = report(label, a.clients, reqs, tally, wall, rss, stats)
                errors += len(tally.errors)
                print(f"   server RSS after the pass: {srv.rss_kib() / 1024:.1f} MiB")
            results[name] = (cps, tps)
    if "serialised" in results:
        b, s = results["batched"], results["serialised"]
        print(f"\nbatched / serialised: {b[0] / s[0]:.2f}x completions/s, {b[1] / s[1]:.2f}x tokens/s")
    print(f"errors: {errors}")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
