"""The GPU benchmarks' own logic, run on CPU: the HTTP phases of `benchmarks/serve_gpu.py` against the
real app, and the engine step `benchmarks/graph_step.py` times (a change of the engine's step must not
leave the benchmark broken until the next GPU run)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


def test_serve_gpu_phases_run_once_per_step_count_against_a_running_service(tiny_weights, tmp_path):
    import serve_gpu

    from service.testing import serve_in_thread, tiny_settings

    args = SimpleNamespace(step_counts=[3, 2], single_length=16, length_list=[16], mixed=[16, 24], no_mixed=False,
                           inflight_residues=64, count=1, phase_seconds=2.0)
    report = {"phases": {}}
    out = tmp_path / "serve_gpu.json"
    with serve_in_thread(tiny_settings(tiny_weights, max_total_residues=4096)) as srv:
        serve_gpu.run_phases(srv.url, args, report, out)
    phases = report["phases"]
    assert set(phases) == {f"{p}_s{s}" for s in (3, 2) for p in ("single_L16", "load_L16", "load_mixed")}
    for steps in (3, 2):
        assert phases[f"single_L16_s{steps}"]["status"] == 200
        assert phases[f"single_L16_s{steps}"]["steps"] == steps  # the server ran the requested count
        for name in (f"load_L16_s{steps}", f"load_mixed_s{steps}"):
            res = phases[name]
            assert res["codes"] == {200: res["requests"]} and res["samples"] > 0
            # engine figures come from /metrics: every sample took `steps` denoiser steps
            assert res["engine_steps"] >= steps and res["mean_step_ms"] > 0 and res["mean_batch_size"] >= 1
    assert out.is_file() and "mhcflash_attention_backend_info" in "\n".join(report["metrics_tail"])


def test_steady_rate_counts_whole_waves_after_the_ramp_up():
    from serve_gpu import steady_rate

    # 4 clients in lockstep, answers in waves at 6, 12 and 18 s (4 samples of 100 residues each), deadline 20 s,
    # the wave at 24 s after it: the sustained rate is 2 waves in 12 s, not 3 waves in 20 s or 14 s
    done = [(t + 0.01 * k, 200, 4, 400, 6.0) for t in (6.0, 12.0, 18.0, 24.0) for k in range(4)]
    first = [6.0 + 0.01 * k for k in range(4)]
    res = steady_rate(done, first, t_end=20.0)
    assert res["requests"] == 8 and res["window_s"] == pytest.approx(12.0)
    assert res["backbones_per_s"] == pytest.approx(32 / 12.0) and res["residues_per_s"] == pytest.approx(3200 / 12.0)
    assert steady_rate(done, first, t_end=8.0) is None  # no answer between the ramp-up and the deadline


def test_step_summary_is_the_difference_of_two_metric_readings():
    from serve_gpu import step_summary

    before = {"mhcflash_step_duration_seconds_sum": 1.0, "mhcflash_step_duration_seconds_count": 10,
              "mhcflash_batch_size_sum": 40, "mhcflash_batch_size_count": 10}
    after = {"mhcflash_step_duration_seconds_sum": 1.5, "mhcflash_step_duration_seconds_count": 20,
             "mhcflash_batch_size_sum": 140, "mhcflash_batch_size_count": 20}
    assert step_summary(before, after) == pytest.approx({"engine_steps": 10, "mean_step_ms": 50.0,
                                                         "mean_batch_size": 10.0})
    assert step_summary(after, after)["mean_step_ms"] is None


@pytest.mark.parametrize("self_conditioning", [False, True], ids=["plain", "self_conditioned"])
def test_graph_step_engine_step_advances_every_slot(tmp_path, self_conditioning):
    import graph_step

    from model.diffusion import Schedule
    from model.sampling_step import SamplingStep
    from model.weights_io import load_weights
    from service.engine import SamplingEngine
    from service.testing import make_tiny_weights

    weights = make_tiny_weights(tmp_path / "w", selfConditioning=self_conditioning)
    loaded = load_weights(weights, "cpu")
    schedule = Schedule.from_config(loaded.config)
    T = schedule.num_timesteps
    device = torch.device("cpu")
    engine = SamplingEngine(SamplingStep(loaded.denoiser.eval(), schedule, device=device, graphed=False),
                            num_timesteps=T, device=device, residue_budget=1 << 12, queue_max_samples=1,
                            to_pdb=lambda ca: "")
    slots = graph_step.make_slots(3, 12, T, device)
    start = [s.x.clone() for s in slots]
    fn = graph_step.engine_step_fn(engine, slots)
    with torch.no_grad():
        out = fn()
        fn()
    assert out.shape == (3, 16, 3) and torch.isfinite(out[:, :12]).all()  # lengths padded to 8s
    assert all(not torch.equal(s.x, x0) for s, x0 in zip(slots, start, strict=True))
