"""Prometheus metrics of the sampling service (prometheus-client).

Naming follows vLLM / Triton Inference Server: a `mhcflash_` prefix, base units in the name
(`_seconds`, `_bytes`, `_ratio`), `_total` on counters, `_info` for constant label sets. Each app
instance owns its own `CollectorRegistry`, so tests can build many apps in one process.

GPU memory gauges are read at scrape time from `torch.cuda` (allocated, reserved, peak since start,
total). On CPU they are 0, and `process_resident_memory_bytes` (the standard process collector,
Linux) is the memory to watch.
"""

from __future__ import annotations

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

# Request latency on CPU spans ms (rejections) to minutes (long chains, all T steps).
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# NOTE: process-wide switch: drop the `_created` timestamp series (vLLM does the same); they double
# the scrape size and no dashboard uses them.
disable_created_metrics()


class ServiceMetrics:
    """All metrics of one app instance; `render()` is the `/metrics` body."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "mhcflash_request_duration_seconds",
            "POST /sample latency, received to response (successful requests).",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.queue_wait = Histogram(
            "mhcflash_queue_wait_seconds",
            "Time from submit until a request's first sample enters a batch.",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.step_duration = Histogram(
            "mhcflash_step_duration_seconds",
            "One batched reverse-diffusion step (denoiser + reverse step): device time between CUDA events "
            "on a GPU (reported up to two steps late: the host runs ahead), wall time on a CPU.",
            registry=r,
            buckets=STEP_BUCKETS,
        )
        self.requests = Counter(
            "mhcflash_requests",
            "HTTP responses by route template and status code, all routes (service/request_metrics.py).",
            ["route", "code"],
            registry=r,
        )
        self.samples_generated = Counter(
            "mhcflash_samples_generated", "Backbones sampled to completion.", registry=r
        )
        self.residues_generated = Counter(
            "mhcflash_residues_generated", "Residues in completed backbones.", registry=r
        )
        self.samples_cancelled = Counter(
            "mhcflash_samples_cancelled", "Samples dropped because their client left or timed out.", registry=r
        )
        self.batch_size = Histogram(
            "mhcflash_batch_size", "Samples in one denoiser step.", registry=r, buckets=BATCH_BUCKETS
        )
        self.batch_occupancy = Histogram(
            "mhcflash_batch_occupancy_ratio",
            "Padded residues of a step over the residue budget.",
            registry=r,
            buckets=RATIO_BUCKETS,
        )
        self.batch_padding_efficiency = Histogram(
            "mhcflash_batch_real_residues_ratio",
            "Real residues of a step over its padded residues (1 = no padding).",
            registry=r,
            buckets=RATIO_BUCKETS,
        )
        self.queue_depth = Gauge("mhcflash_queue_depth", "Samples waiting to enter a batch.", registry=r)
        self.active_samples = Gauge("mhcflash_active_samples", "Samples in the running batch.", registry=r)
        self.residue_budget = Gauge(
            "mhcflash_residue_budget", "Padded residues allowed per step (lowered after OOM).", registry=r
        )
        self.errors = Counter(
            "mhcflash_errors",
            "Errors by kind (oom, step, worker_crash, timeout, internal, startup).",
            ["kind"],
            registry=r,
        )
        self.rejected = Counter(
            "mhcflash_requests_rejected",
            "Requests refused before sampling, by reason.",
            ["reason"],
            registry=r,
        )
        self.engine_up = Gauge("mhcflash_engine_up", "1 while the engine worker runs, else 0.", registry=r)
        self.cuda_graphs_cached = Gauge("mhcflash_cuda_graphs_cached", "Captured CUDA graphs of the sampling step.",
                                        registry=r)
        self.engine_restarts = Counter(
            "mhcflash_engine_restarts", "Engine worker restarts after a crash.", registry=r
        )
        self.attention_backend = Info(
            "mhcflash_attention_backend", "Attention backend in use and FlashAttention version.", registry=r
        )
        self.model_info = Info("mhcflash_model", "Loaded model and runtime versions.", registry=r)
        for kind in ("oom", "step", "worker_crash", "timeout", "internal"):
            self.errors.labels(kind=kind)
        for reason in ("queue_full", "shutting_down", "engine_down", "limits", "unauthorized"):
            self.rejected.labels(reason=reason)
        ProcessCollector(registry=r)  # process_resident_memory_bytes etc. (Linux)
        self._gpu_memory = _GpuMemoryCollector(device)
        r.register(self._gpu_memory)

    def set_device(self, device: torch.device) -> None:
        """The device the GPU memory gauges read (known once the lifespan has picked it)."""
        self._gpu_memory.device = device

    def expect_responses(self, codes: dict[str, set[int]]) -> None:
        """Create `mhcflash_requests_total{route, code}` at 0 for each route and code it can answer."""
        for route, route_codes in codes.items():
            for code in route_codes:
                self.requests.labels(route=route, code=str(code))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _GpuMemoryCollector:
    """mhcflash_gpu_memory_{allocated,reserved,peak,total}_bytes, read at scrape time."""

    def __init__(self, device: torch.device | None) -> None:
        self.device = device

    def describe(self):
        return []

    def collect(self):
        dev = self.device
        on_gpu = dev is not None and dev.type == "cuda" and torch.cuda.is_available()
        values = {"allocated": 0, "reserved": 0, "peak": 0, "total": 0}
        if on_gpu:
            values = {
                "allocated": torch.cuda.memory_allocated(dev),
                "reserved": torch.cuda.memory_reserved(dev),
                "peak": torch.cuda.max_memory_allocated(dev),
                "total": torch.cuda.get_device_properties(dev).total_memory,
            }
        label = str(dev) if dev is not None else "none"
        for key, value in values.items():
            family = GaugeMetricFamily(
                f"mhcflash_gpu_memory_{key}_bytes",
                f"GPU memory {key} (torch.cuda; 0 on CPU).",
                labels=["device"],
            )
            family.add_metric([label], float(value))
            yield family
