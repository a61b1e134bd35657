"""Serving benchmark on a GPU through the real HTTP service (uvicorn on loopback, shipped weights).

Phases, each bounded in requests and time:
  1. single-request latency: one request, count 1, idle server (L = 128 by default), end to end;
  2. throughput at fixed lengths: C concurrent clients keep the engine full for a fixed number of
     requests; backbones/s, p50 / p99 latency, mean step time and batch size from the engine;
  3. a mixed-length load.
Also records the engine's per-step time so the floor (steps x step time) is visible.

    python benchmarks/serve_gpu.py --weights weights/ --out DIR [--lengths 128,256] [--precision bf16] \
        [--inflight-residues 16384] [--count 4] [--phase-seconds 90] [--compile auto|on|off] \
        [--mixed-lengths 64,100,128,200,256]

A phase starts new requests until --phase-seconds have passed and then waits for those in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from load_service import pct
from stack import stack

from service.settings import ServiceSettings
from service.testing import serve_in_thread


async def load(url: str, bodies: list[dict], clients: int, deadline_s: float) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    lat, codes, samples, residues = [], {}, 0, 0
    t_end = time.monotonic() + deadline_s

    async def worker(client: httpx.AsyncClient):
        nonlocal samples, residues
        while not queue.empty() and time.monotonic() < t_end:
            body = queue.get_nowait()
            t0 = time.monotonic()
            r = await client.post(f"{url}/sample", json=body, timeout=900)
            lat.append(time.monotonic() - t0)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            if r.status_code == 200:
                samples += body.get("count", 1)
                residues += body["length"] * body.get("count", 1)

    t0 = time.monotonic()
    async with httpx.AsyncClient() as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    wall = time.monotonic() - t0
    return {"requests": len(lat), "codes": codes, "samples": samples, "wall_s": wall, "backbones_per_s": samples / wall,
                "residues_per_s": residues / wall, "latency_p50_s": pct(lat, 0.5), "latency_p99_s": pct(lat, 0.99)}


def engine_stats(srv) -> dict:
    eng = srv.app.state.service.engine
    s = eng.stats
    return {k: getattr(s, k) for k in dir(s) if not k.startswith("_") and isinstance(getattr(s, k), (int, float))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=Path, default=Path("weights"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lengths", default="128,256")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--residue-budget", type=int, default=32768)
    ap.add_argument("--inflight-residues", type=int, default=16384,
                    help="clients per length = this / (length * count): residues kept in flight")
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="MHCFLASH_COMPILE")
    ap.add_argument("--length-group-ratio", type=float, default=0.75, help="MHCFLASH_LENGTH_GROUP_RATIO")
    ap.add_argument("--phase-seconds", type=float, default=90.0)
    ap.add_argument("--no-mixed", action="store_true")
    ap.add_argument("--mixed-lengths", default="64,100,128,200,256",
                    help="lengths the mixed load draws from (uniformly, seeded)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = ServiceSettings(weights=args.weights, device=args.device, precision=args.precision,
                               residue_budget=args.residue_budget, queue_max_samples=4096, max_count=64, compile=args.compile,
                               length_group_ratio=args.length_group_ratio,
                               max_total_residues=65536, request_timeout_s=900.0, log_level="warning",
                               exit_on_engine_death=False)
    report = {"stack": stack(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
              "precision": args.precision, "length_group_ratio": args.length_group_ratio,
              "residue_budget": args.residue_budget, "phases": {}}
    with serve_in_thread(settings) as srv:
        info = httpx.get(f"{srv.url}/info").json()
        report["info"] = info
        t0 = time.monotonic()
        r = httpx.post(f"{srv.url}/sample", json={"length": 128, "seed": 0}, timeout=900)
        report["phases"]["single_L128"] = {"status": r.status_code, "latency_s": time.monotonic() - t0,
                                               "server_timings": r.json().get("timings") if r.status_code == 200 else r.text}
        print("single request L=128:", json.dumps(report["phases"]["single_L128"]), flush=True)
        (args.out / "serve_gpu.json").write_text(json.dumps(report, indent=1, default=str))
        for L in [int(x) for x in args.lengths.split(",") if x]:
            clients = max(1, round(args.inflight_residues / (L * args.count)))
            bodies = [{"length": L, "count": args.count, "seed": i} for i in range(4 * clients)]
            before = engine_stats(srv)
            res = asyncio.run(load(srv.url, bodies, clients, args.phase_seconds))
            res["clients"], res["count"] = clients, args.count
            res["engine_before"], res["engine_after"] = before, engine_stats(srv)
            report["phases"][f"load_L{L}"] = res
            print(f"L={L}: {json.dumps({k: v for k, v in res.items() if not k.startswith('engine')})}", flush=True)
            (args.out / "serve_gpu.json").write_text(json.dumps(report, indent=1, default=str))
        if args.no_mixed:
            return
        rng = random.Random(0)
        mixed = [int(x) for x in args.mixed_lengths.split(",")]
        clients = max(1, round(args.inflight_residues / (sum(mixed) / len(mixed) * args.count)))
        bodies = [{"length": rng.choice(mixed), "count": args.count, "seed": i} for i in range(4 * clients)]
        res = asyncio.run(load(srv.url, bodies, clients, args.phase_seconds))
        res["clients"], res["count"] = clients, args.count
        res["lengths"] = mixed
        report["phases"]["load_mixed"] = res
        print(f"mixed: {json.dumps(res)}", flush=True)
        report["metrics_tail"] = [ln for ln in httpx.get(f"{srv.url}/metrics").text.splitlines()
                                  if ln.startswith(("mhcflash_gpu_memory", "mhcflash_attention", "mhcflash_step_duration_seconds_sum",
                                                    "mhcflash_step_duration_seconds_count", "mhcflash_batch_size_sum"))]
        print("\n".join(report["metrics_tail"]))
    (args.out / "serve_gpu.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
