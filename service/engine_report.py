"""What the sampling engine reports: its counters (`EngineStats`, read by /info and the tests) and its
Prometheus metrics (`service.metrics.ServiceMetrics`, optional: an engine without metrics only counts).
"""

from __future__ import annotations

from service.batching import padded
from service.jobs import EngineStats, Slot

__all__ = ["EngineReport"]


class EngineReport:
    """`stats` always; the Prometheus side only when `metrics` is given."""

    def __init__(self, metrics=None) -> None:
        self.metrics = metrics
        self.stats = EngineStats()

    def batch(self, batch: list[Slot], pad_multiple: int, residue_budget: int) -> None:
        """One group's step ran: batch size, mix of lengths / requests / timesteps, occupancy, padding."""
        st = self.stats
        st.batches_run += 1
        st.max_batch_size = max(st.max_batch_size, len(batch))
        st.max_distinct_lengths = max(st.max_distinct_lengths, len({s.length for s in batch}))
        st.max_distinct_requests = max(st.max_distinct_requests, len({s.job.id for s in batch}))
        st.max_distinct_timesteps = max(st.max_distinct_timesteps, len({s.t for s in batch}))
        if self.metrics is not None:
            size = len(batch) * padded(max(s.length for s in batch), pad_multiple)
            real = sum(s.length for s in batch)
            self.metrics.batch_size.observe(len(batch))
            self.metrics.batch_occupancy.observe(min(1.0, size / residue_budget))
            self.metrics.batch_padding_efficiency.observe(real / size)

    def graphs(self, graph_stats) -> None:
        """The step's CUDA-graph counters (`model.cuda_graphs.GraphStats`)."""
        st = self.stats
        st.cuda_graphs_cached, st.cuda_graph_captures = graph_stats.cached, graph_stats.captures
        st.cuda_graph_replays = graph_stats.replays
        if self.metrics is not None and hasattr(self.metrics, "cuda_graphs_cached"):
            self.metrics.cuda_graphs_cached.set(graph_stats.cached)

    def admitted(self, queue_wait_s: float) -> None:
        if self.metrics is not None:
            self.metrics.queue_wait.observe(queue_wait_s)

    def finished(self, length: int) -> None:
        self.stats.samples_completed += 1
        if self.metrics is not None:
            self.metrics.samples_generated.inc()
            self.metrics.residues_generated.inc(length)

    def cancelled(self, n: int) -> None:
        if n:
            self.stats.samples_cancelled += n
            if self.metrics is not None:
                self.metrics.samples_cancelled.inc(n)

    def error(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.errors.labels(kind=kind).inc()

    def restarted(self) -> None:
        self.stats.worker_restarts += 1
        if self.metrics is not None:
            self.metrics.engine_restarts.inc()

    def gauge(self, name: str, value: float) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).set(value)

    def depth(self, queued: int, active: int) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(queued)
            self.metrics.active_samples.set(active)
