"""Serving benchmark on a GPU through the real HTTP service (uvicorn on loopback, shipped weights).

Phases, each bounded in requests and time:
  1. single-request latency: one request, count 1, idle server (--single-length, 128), end to end;
  2. throughput at fixed lengths: C concurrent clients keep the engine full for a fixed number of
     requests; backbones/s, p50 / p99 latency, mean step time and batch size from the engine;
  3. a mixed-length load.
Also records the engine's per-step time so the floor (steps x step time) is visible.

    python benchmarks/serve_gpu.py --weights weights/ --out DIR [--lengths 128,256] [--precision bf16] \
        [--inflight-residues 16384] [--count 4] [--phase-seconds 90] [--compile auto|on|off] \
        [--mixed-lengths 64,100,128,200,256] [--steps 1000,250] [--url http://host:port]

``--steps``: every phase runs once per step count (``steps`` in the request body), in the same server,
so fewer-step rates and the full sampler's come from one run. ``--url``: measure a service that is
already running (e.g. one started from the image's install) instead of starting one in this process;
the engine's step time and batch size then come from its ``/metrics``.

A phase keeps every client's request in flight until --phase-seconds have passed and then waits for
those in flight; it reports the whole phase (drain included) and the steady rate before the deadline.
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


async def load(url: str, make_body, clients: int, deadline_s: float) -> dict:
    """``clients`` closed-loop clients: each sends ``make_body(i)`` (i counts requests), waits for the answer
    and sends the next until ``deadline_s`` has passed; the phase ends when the last answer arrives.

    Whole phase (``backbones_per_s``, ``residues_per_s``): everything answered over the whole wall time,
    the drain included (the last requests run in an emptying engine). ``steady``: the sustained rate
    while every client keeps a request in flight: the answers after every client's first answer (the
    ramp-up) up to the last answer before the deadline, over that span. Same-length clients answer in
    waves, so the span runs from the end of a wave to the end of another. None when the phase was too
    short for such a span.
    """
    done = []  # (t_answered, status, samples, residues, latency)
    first: dict[int, float] = {}  # client -> its first answer
    counter = iter(range(1 << 30))
    t0 = time.monotonic()
    t_end = t0 + deadline_s

    async def worker(k: int, client: httpx.AsyncClient):
        while time.monotonic() < t_end:
            body = make_body(next(counter))
            t_sent = time.monotonic()
            r = await client.post(f"{url}/sample", json=body, timeout=900)
            t_done = time.monotonic()
            first.setdefault(k, t_done)
            n = body.get("count", 1) if r.status_code == 200 else 0
            done.append((t_done, r.status_code, n, n * body["length"], t_done - t_sent))

    async with httpx.AsyncClient() as client:
        await asyncio.gather(*(worker(k, client) for k in range(clients)))
    wall = time.monotonic() - t0
    codes: dict[int, int] = {}
    for _, code, *_ in done:
        codes[code] = codes.get(code, 0) + 1
    lat = [d[4] for d in done]
    return {"requests": len(done), "codes": codes, "samples": sum(d[2] for d in done), "wall_s": wall,
            "backbones_per_s": sum(d[2] for d in done) / wall, "residues_per_s": sum(d[3] for d in done) / wall,
            "latency_p50_s": pct(lat, 0.5), "latency_p99_s": pct(lat, 0.99),
            "steady": steady_rate(done, list(first.values()), t_end)}


def steady_rate(done: list[tuple], first: list[float], t_end: float) -> dict | None:
    """The sustained rate of a closed-loop phase: ``done`` (t_answered, status, samples, residues, latency),
    ``first`` every client's first answer. Counts the answers after the last client's first answer up to
    the deadline, over the span from that first answer to the last one counted."""
    ramp = max(first, default=t_end)
    window = [d for d in done if ramp < d[0] <= t_end]
    if not window:
        return None
    span = max(d[0] for d in window) - ramp
    return {"window_s": span, "requests": len(window), "backbones_per_s": sum(d[2] for d in window) / span,
            "residues_per_s": sum(d[3] for d in window) / span}


METRIC_SUMS = ("mhcflash_step_duration_seconds", "mhcflash_batch_size")


def engine_stats(url: str) -> dict:
    """Step time and batch size sums / counts from the service's ``/metrics`` (Prometheus text)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        if family.name in METRIC_SUMS:
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")):
                    out[sample.name] = sample.value
    return out


def step_summary(before: dict, after: dict) -> dict:
    """Mean step time (ms) and batch size over a phase, from two `engine_stats` readings."""
    diff = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    steps = diff.get("mhcflash_step_duration_seconds_count", 0.0)
    return {"engine_steps": steps,
            "mean_step_ms": 1e3 * diff.get("mhcflash_step_duration_seconds_sum", 0.0) / steps if steps else None,
            "mean_batch_size": diff.get("mhcflash_batch_size_sum", 0.0) / steps if steps else None}


def run_phases(url: str, args, report: dict, out_file: Path) -> None:
    """Single-request latency, fixed lengths and the mixed load, once per step count."""
    def save() -> None:
        out_file.write_text(json.dumps(report, indent=1, default=str))

    report["info"] = httpx.get(f"{url}/info", timeout=30).json()
    for steps in args.step_counts:
        tag = "" if steps is None else f"_s{steps}"
        extra = {} if steps is None else {"steps": steps}
        t0 = time.monotonic()
        r = httpx.post(f"{url}/sample", json={"length": args.single_length, "seed": 0, **extra}, timeout=900)
        body = r.json() if r.status_code == 200 else {}
        single = {"status": r.status_code, "latency_s": time.monotonic() - t0, "steps": body.get("steps"),
                  "server_timings": body.get("timings", r.text)}
        report["phases"][f"single_L{args.single_length}{tag}"] = single
        print(f"single request L={args.single_length}{tag}:", json.dumps(single), flush=True)
        save()
        loads = [(f"load_L{L}{tag}", [L]) for L in args.length_list]
        if not args.no_mixed:
            loads.append((f"load_mixed{tag}", args.mixed))
        for name, lengths in loads:
            rng = random.Random(0)
            clients = max(1, round(args.inflight_residues / (sum(lengths) / len(lengths) * args.count)))

            def make_body(i: int, lengths=lengths, rng=rng, extra=extra) -> dict:
                return {"length": rng.choice(lengths), "count": args.count, "seed": i, **extra}

            before = engine_stats(url)
            res = asyncio.run(load(url, make_body, clients, args.phase_seconds))
            res.update(clients=clients, count=args.count, lengths=lengths, steps=steps,
                       **step_summary(before, engine_stats(url)))
            report["phases"][name] = res
            print(f"{name}: {json.dumps(res)}", flush=True)
            save()
    report["metrics_tail"] = [ln for ln in httpx.get(f"{url}/metrics", timeout=30).text.splitlines()
                              if ln.startswith(("mhcflash_gpu_memory", "mhcflash_attention", "mhcflash_model_info"))]
    print("\n".join(report["metrics_tail"]))
    save()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=Path, default=Path("weights"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lengths", default="128,256")
    ap.add_argument("--single-length", type=int, default=128, help="length of the single-request latency phase")
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
    ap.add_argument("--steps", default="",
                    help="comma-separated step counts; every phase runs once per count (empty: the server's default)")
    ap.add_argument("--url", default=None, help="a running service to measure (default: start one in this process)")
    ap.add_argument("--label", default="", help="name of this run in the JSON (e.g. the attention backend)")
    args = ap.parse_args()
    args.length_list = [int(x) for x in args.lengths.split(",") if x]
    args.mixed = [int(x) for x in args.mixed_lengths.split(",")]
    args.step_counts = [int(x) for x in args.steps.split(",") if x] or [None]
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / f"serve_gpu{'_' + args.label if args.label else ''}.json"
    report = {"stack": stack(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "precision": args.precision, "length_group_ratio": args.length_group_ratio,
              "residue_budget": args.residue_budget, "label": args.label, "url": args.url, "phases": {}}
    if args.url:
        run_phases(args.url.rstrip("/"), args, report, out_file)
        return
    settings = ServiceSettings(weights=args.weights, device=args.device, precision=args.precision,
                               residue_budget=args.residue_budget, queue_max_samples=4096, max_count=64, compile=args.compile,
                               length_group_ratio=args.length_group_ratio,
                               max_total_residues=65536, request_timeout_s=900.0, log_level="warning",
                               exit_on_engine_death=False)
    with serve_in_thread(settings) as srv:
        run_phases(srv.url, args, report, out_file)


if __name__ == "__main__":
    main()
