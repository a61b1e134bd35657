"""Bounded load run of the sampling service on loopback: dynamic batching vs one request at a time.

For each mode, N concurrent clients send a fixed number of `POST /sample` requests with a mix of
lengths to the real app (uvicorn on 127.0.0.1, real sockets), and we report throughput, latency
p50 / p99, the engine's batching counters, and process memory before / after (soak). An overload
phase then fires a burst at a small queue and reports how many were accepted, rejected (429) and
lost (must be 0), and how fast the rejections came back.

    python benchmarks/load_service.py                      # tiny random model on CPU (~1-2 min)
    python benchmarks/load_service.py --weights weights/  --device cuda --requests 200 --clients 32

Prints a table and writes JSON (default benchmarks/results/load_service.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.testing import make_tiny_weights, serve_in_thread, tiny_settings


def rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


async def run_load(url: str, *, requests: int, clients: int, lengths: list[int], seed: int) -> dict:
    rng = random.Random(seed)
    plan = [{"length": rng.choice(lengths), "seed": i} for i in range(requests)]
    queue = asyncio.Queue()
    for body in plan:
        queue.put_nowait(body)
    latencies, codes, residues = [], {}, 0

    async def client_loop(client):
        nonlocal residues
        while not queue.empty():
            body = queue.get_nowait()
            t0 = time.perf_counter()
            r = await client.post("/sample", json=body)
            latencies.append(time.perf_counter() - t0)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            if r.status_code == 200:
                residues += sum(s["length"] for s in r.json()["samples"])

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*[client_loop(c) for _ in range(clients)])
        wall = time.perf_counter() - t0
    ok = codes.get(200, 0)
    return {"requests": requests, "clients": clients, "codes": codes, "wall_s": wall,
            "samples_per_s": ok / wall, "residues_per_s": residues / wall,
            "latency_p50_s": pct(latencies, 0.5), "latency_p99_s": pct(latencies, 0.99),
            "latency_mean_s": statistics.fmean(latencies)}


async def run_overload(url: str, *, burst: int, length: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        async def one():
            t0 = time.perf_counter()
            r = await c.post("/sample", json={"length": length})
            return r.status_code, time.perf_counter() - t0, r.headers.get("retry-after")

        results = await asyncio.gather(*[one() for _ in range(burst)])
        after = await c.post("/sample", json={"length": length})  # recovered once the burst is over
    rejected = [lat for code, lat, _ in results if code == 429]
    accepted = [lat for code, lat, _ in results if code == 200]
    return {"sent": burst, "accepted": len(accepted), "rejected_429": len(rejected),
            "other": burst - len(accepted) - len(rejected), "lost": 0,
            "reject_latency_max_s": max(rejected) if rejected else None,
            "accepted_latency_p99_s": pct(accepted, 0.99),
            "retry_after_s": sorted({ra for code, _, ra in results if code == 429}),
            "recovered_status": after.status_code}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", type=Path, default=None, help="weights dir (default: a tiny random model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--lengths", default="13,22,31,40,55,64")
    ap.add_argument("--residue-budget", type=int, default=512)
    ap.add_argument("--soak-rounds", type=int, default=3, help="rounds of the dynamic mode (memory soak)")
    ap.add_argument("--timesteps", type=int, default=20, help="T of the tiny model")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "load_service.json")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    weights = args.weights or make_tiny_weights(Path(tempfile.mkdtemp()) / "tiny", numTimesteps=args.timesteps)
    report = {"device": args.device, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "weights": str(weights), "lengths": lengths, "modes": {}}
    # dynamic: continuous batching with length groups (the default); dynamic_one_batch: every step one
    # batch padded to the longest active sample (MHCFLASH_LENGTH_GROUP_RATIO=0); one_at_a_time: baseline
    for mode, max_batch_requests, group_ratio in (("dynamic", 0, 0.75), ("dynamic_one_batch", 0, 0.0),
                                                  ("one_at_a_time", 1, 0.75)):
        settings = tiny_settings(weights, device=args.device, residue_budget=args.residue_budget,
                                 max_batch_requests=max_batch_requests, queue_max_samples=1024, max_count=8,
                                 length_group_ratio=group_ratio)
        with serve_in_thread(settings) as srv:
            rss0 = rss_bytes()
            res = asyncio.run(run_load(srv.url, requests=args.requests, clients=args.clients, lengths=lengths, seed=0))
            soak = [rss_bytes() / 2**20]
            for r in range(1, args.soak_rounds if mode == "dynamic" else 1):  # memory over repeated rounds
                asyncio.run(run_load(srv.url, requests=args.requests, clients=args.clients, lengths=lengths, seed=r))
                soak.append(rss_bytes() / 2**20)
            res["rss_after_each_round_mb"] = soak
            stats = srv.app.state.service.engine.stats
            res.update(rss_before_mb=rss0 / 2**20, rss_after_mb=rss_bytes() / 2**20, batches=stats.batches_run,
                       max_batch_size=stats.max_batch_size, max_distinct_lengths=stats.max_distinct_lengths,
                       max_distinct_timesteps=stats.max_distinct_timesteps)
            report["modes"][mode] = res
    settings = tiny_settings(weights, device=args.device, residue_budget=args.residue_budget, queue_max_samples=8)
    with serve_in_thread(settings) as srv:
        report["overload"] = asyncio.run(run_overload(srv.url, burst=32, length=40))
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return report


def print_table(report: dict) -> None:
    print(f"\nload run on {report['device']} (torch {report['torch']}, {report['threads']} threads), "
          f"lengths {report['lengths']}")
    print(f"{'mode':<15}{'req':>5}{'ok':>5}{'samples/s':>11}{'res/s':>9}{'p50 s':>8}{'p99 s':>8}"
          f"{'batches':>9}{'max B':>7}{'lens':>6}{'RSS MB':>14}")
    for mode, r in report["modes"].items():
        print(f"{mode:<15}{r['requests']:>5}{r['codes'].get(200, 0):>5}{r['samples_per_s']:>11.2f}"
              f"{r['residues_per_s']:>9.1f}{r['latency_p50_s']:>8.2f}{r['latency_p99_s']:>8.2f}{r['batches']:>9}"
              f"{r['max_batch_size']:>7}{r['max_distinct_lengths']:>6}"
              f"{r['rss_before_mb']:>7.0f}->{r['rss_after_mb']:<5.0f}")
    o = report["overload"]
    print(f"overload burst: sent {o['sent']}, accepted {o['accepted']}, rejected 429 {o['rejected_429']}, "
          f"other {o['other']}, lost {o['lost']}, slowest 429 {o['reject_latency_max_s']}, "
          f"Retry-After {o['retry_after_s']}, after burst: {o['recovered_status']}")
    soak = report["modes"]["dynamic"]["rss_after_each_round_mb"]
    print("RSS after each dynamic round (MB): " + ", ".join(f"{v:.0f}" for v in soak))


if __name__ == "__main__":
    main()
