"""service.pacing: the bounded run-ahead of the engine's host thread, and its step timing."""

from __future__ import annotations

import time

import pytest
import torch

from service.pacing import StepPacer, to_device


def test_cpu_pacer_reports_each_step_at_once_with_its_wall_time():
    seen = []
    pacer = StepPacer(torch.device("cpu"), observe=seen.append)
    for sleep_s in (0.0, 0.03):
        token = pacer.begin()
        time.sleep(sleep_s)
        pacer.end(token)
    assert len(seen) == 2 and pacer.in_flight == 0
    assert seen[0] < 0.02 and 0.03 <= seen[1] < 0.5


def test_pacer_rejects_no_run_ahead():
    with pytest.raises(ValueError, match="ahead"):
        StepPacer(torch.device("cpu"), ahead=0)


def test_to_device_keeps_values_and_dtype():
    t = to_device([3, 1000, 2], torch.long, torch.device("cpu"))
    s = to_device([0.6, 1.0], torch.float32, torch.device("cpu"))
    assert t.dtype == torch.long and t.tolist() == [3, 1000, 2]
    assert s.dtype == torch.float32 and s.tolist() == pytest.approx([0.6, 1.0])


@pytest.mark.gpu
def test_cuda_pacer_runs_ahead_by_at_most_ahead_steps_and_times_them_on_the_device():
    dev = torch.device("cuda")
    seen = []
    pacer = StepPacer(dev, ahead=2, observe=seen.append)
    x = to_device([5, 7], torch.long, dev)  # a pinned, non-blocking copy
    torch.cuda.synchronize()
    cycles = int(50e-3 * torch.cuda.get_device_properties(dev).clock_rate * 1e3)  # ~50 ms of GPU spin
    token = pacer.begin()  # warm-up: the first _sleep launch loads its kernel (~36 ms on an H100)
    torch.cuda._sleep(1000)
    pacer.end(token)
    pacer.drain()
    seen.clear()
    enqueue = []
    for _ in range(4):
        t0 = time.perf_counter()
        token = pacer.begin()
        torch.cuda._sleep(cycles)
        pacer.end(token)
        enqueue.append(time.perf_counter() - t0)
    # steps 1-2 are enqueued without waiting; step 3 waits for step 1, step 4 for step 2
    assert enqueue[0] < 0.02 and enqueue[1] < 0.02, enqueue
    assert enqueue[2] > 0.02 and enqueue[3] > 0.02, enqueue
    assert len(seen) == 2 and pacer.in_flight == 2
    pacer.drain()
    assert len(seen) == 4 and pacer.in_flight == 0
    assert all(0.02 < s < 0.5 for s in seen), seen
    assert x.tolist() == [5, 7]
