"""ServerMetrics: the Prometheus metrics of one server app (vLLM's names, `rapidserve:` prefix)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from rapidserve.async_engine import RequestStream
from rapidserve.serving.front import KV_TRANSFER_BUCKETS, EngineStats, KVTransferStats
from rapidserve.resources.policy import REACTION_BUCKETS, PartitionStats

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)
_ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)


class _KVTransferCollector:
    """The disagg mode's KV transfers, exported from the engine's running totals at scrape time
    (the engine counts them, with a fixed-bucket histogram of their durations; 0 elsewhere)."""

    def __init__(self, model_name: str) -> None:
        self.labels = [model_name]
        self.stats = KVTransferStats(0, 0, 0.0, (0,) * len(KV_TRANSFER_BUCKETS), 0, 0)

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        count = CounterMetricFamily("rapidserve:kv_transfer", "KV transfers from the prefill to the "
                                    "decode instance (disagg mode).", labels=["model_name"])
        count.add_metric(self.labels, s.num_transfers)
        nbytes = CounterMetricFamily("rapidserve:kv_transfer_bytes", "Bytes of KV transferred "
                                     "(disagg mode).", labels=["model_name"])
        nbytes.add_metric(self.labels, s.num_bytes)
        seconds = HistogramMetricFamily("rapidserve:kv_transfer_seconds", "Time of one KV transfer, "
                                        "copy issued to arrival (disagg mode).", labels=["model_name"])
        buckets = [(str(b), c) for b, c in zip(KV_TRANSFER_BUCKETS, s.bucket_counts)]
        seconds.add_metric(self.labels, buckets + [("+Inf", s.num_transfers)], s.seconds)
        yield from (count, nbytes, seconds)


class _PartitionCollector:
    """The rapid mode's SM partitions, from the decode worker's latest report at scrape time:
    time spent in each, switches, and which one is in force (nothing without a policy)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats: PartitionStats | None = None

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        if s is None:
            return
        seconds = CounterMetricFamily("rapidserve:sm_partition_seconds", "Time the decode worker's steps ran "
                                      "in each SM partition (rapid mode).", labels=["model_name", "partition"])
        current = GaugeMetricFamily("rapidserve:sm_partition_current", "1 for the SM partition in force "
                                    "(rapid mode).", labels=["model_name", "partition"])
        for name, secs in sorted(s.seconds.items()):
            seconds.add_metric([self.model_name, name], secs)
            current.add_metric([self.model_name, name], 1.0 if name == s.current else 0.0)
        switches = CounterMetricFamily("rapidserve:sm_partition_switches", "Changes of SM partition "
                                       "(rapid mode).", labels=["model_name"])
        switches.add_metric([self.model_name], s.switches)
        rate = GaugeMetricFamily("rapidserve:sm_partition_switches_per_second", "Changes of SM partition "
                                 "per second since the first step (rapid mode).", labels=["model_name"])
        rate.add_metric([self.model_name], s.switches_per_s)
        yield from (seconds, current, switches, rate)
        yield from self._reaction(s)
        if s.feedback is not None:
            yield from self._feedback(s)

    def _reaction(self, s: PartitionStats) -> Iterator[Metric]:
        reaction = HistogramMetricFamily(
            "rapidserve:sm_partition_reaction_seconds", "Time from a partition switch's decision to both "
            "workers on the new partition (the prefill worker moves between layer groups; rapid mode).",
            labels=["model_name"])
        counts = s.reaction_buckets or (0,) * len(REACTION_BUCKETS)
        buckets = [(str(b), c) for b, c in zip(REACTION_BUCKETS, counts)]
        reaction.add_metric([self.model_name], buckets + [("+Inf", s.reactions)], s.reaction_s)
        longest = GaugeMetricFamily("rapidserve:sm_partition_reaction_max_seconds", "The longest reaction to "
                                    "a partition switch so far (rapid mode).", labels=["model_name"])
        longest.add_metric([self.model_name], s.reaction_max_s)
        yield from (reaction, longest)

    def _feedback(self, s: PartitionStats) -> Iterator[Metric]:
        f = s.feedback
        assert f is not None
        residual = GaugeMetricFamily(
            "rapidserve:sm_partition_decode_residual", "Measured / predicted decode step time (EWMA) per "
            "partition, context bucket and phase (beside a prefill or alone): the closed loop's correction.",
            labels=["model_name", "partition", "context", "phase"])
        for (partition, context, phase), value in sorted(f.residuals.items()):
            residual.add_metric([self.model_name, partition, context, phase], value)
        trips = CounterMetricFamily("rapidserve:sm_partition_itl_guard_trips", "Times the measured p95 decode "
                                    "step beside a prefill passed the ITL SLO (the guard raised the decode "
                                    "share).", labels=["model_name"])
        trips.add_metric([self.model_name], f.guard_trips)
        releases = CounterMetricFamily("rapidserve:sm_partition_itl_guard_releases", "Times the ITL guard "
                                       "lowered its floor again.", labels=["model_name"])
        releases.add_metric([self.model_name], f.guard_releases)
        floor = GaugeMetricFamily("rapidserve:sm_partition_itl_guard_floor_sms", "Decode SMs a step beside a "
                                  "prefill needs at least while the ITL guard holds (0: no floor).",
                                  labels=["model_name"])
        floor.add_metric([self.model_name], f.guard_floor_sms)
        p95 = GaugeMetricFamily("rapidserve:sm_partition_itl_guard_p95_seconds", "The p95 decode step time "
                                "of the ITL guard's last full window.", labels=["model_name"])
        p95.add_metric([self.model_name], f.guard_p95_s)
        yield from (residual, trips, releases, floor, p95)


class ServerMetrics:
    """Gauges read from the engine's stats at scrape time; histograms and counters fed as
    requests end.

    NOTE: each app gets its own CollectorRegistry (not prometheus_client's global one), so
    that several apps in one process (tests) do not collide on metric names.
    """

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        self._running = gauge("rapidserve:num_requests_running", "Requests in the running batch.")
        self._waiting = gauge("rapidserve:num_requests_waiting", "Requests waiting to be scheduled.")
        self._kv_usage = gauge("rapidserve:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).")
        self._kv_free = gauge("rapidserve:kv_cache_free_blocks", "KV cache blocks free.")
        self._kv_total = gauge("rapidserve:kv_cache_total_blocks", "KV cache blocks in all.")
        self._sm_decode = gauge(
            "rapidserve:sm_partition_decode_sms",
            "SMs the rapid mode's decode worker runs on now (0: no partitioning, other modes).",
        )
        self._ttft = histogram(
            "rapidserve:time_to_first_token_seconds", "Time from arrival to the first token.",
            _LATENCY_BUCKETS)
        self._itl = histogram(
            "rapidserve:inter_token_latency_seconds", "Time between two tokens of a request.",
            _ITL_BUCKETS)
        self._e2e = histogram(
            "rapidserve:e2e_request_latency_seconds", "Time from arrival to the last token.",
            _LATENCY_BUCKETS)
        self._prompt_tokens = counter("rapidserve:prompt_tokens_total", "Prompt tokens prefilled.")
        self._generation_tokens = counter("rapidserve:generation_tokens_total", "Tokens generated.")
        self._preemptions = counter("rapidserve:num_preemptions_total", "Requests preempted.")
        self._memory = Gauge("rapidserve:gpu_memory_reserved_bytes",
                             "GPU memory held by torch in the engine's process (hybrid) or the decode "
                             "worker's (rapid, disagg), and in the disagg prefill instance's (0 on CPU).",
                             ["model_name", "process"], registry=r)
        self._prefill_kv_free = gauge("rapidserve:prefill_kv_cache_free_blocks",
                                      "KV blocks free in the prefill instance's pool (disagg mode; else 0).")
        self._prefill_kv_total = gauge("rapidserve:prefill_kv_cache_total_blocks",
                                       "KV blocks of the prefill instance's pool (disagg mode; else 0).")
        self._transfers = _KVTransferCollector(model_name)
        r.register(self._transfers)
        self._partitions = _PartitionCollector(model_name)
        r.register(self._partitions)
        self._labels = (model_name,)
        self._preemptions_seen = 0
        # Export every series from the start (at 0), not from its first observation.
        for metric in (self._running, self._waiting, self._kv_usage, self._kv_free, self._kv_total,
                       self._sm_decode, self._ttft, self._itl, self._e2e, self._prompt_tokens,
                       self._generation_tokens, self._preemptions, self._prefill_kv_free,
                       self._prefill_kv_total):
            metric.labels(*self._labels)

    def update(self, stats: EngineStats) -> None:
        """Refresh the gauges from the engine's latest snapshot (at scrape time)."""
        lb = self._labels
        self._running.labels(*lb).set(stats.num_running)
        self._waiting.labels(*lb).set(stats.num_waiting)
        self._kv_usage.labels(*lb).set(stats.kv_cache_usage)
        self._kv_free.labels(*lb).set(stats.num_free_blocks)
        self._kv_total.labels(*lb).set(stats.num_total_blocks)
        # The engine counts preemptions since start; the counter advances by what is new.
        if stats.num_preemptions > self._preemptions_seen:
            self._preemptions.labels(*lb).inc(stats.num_preemptions - self._preemptions_seen)
            self._preemptions_seen = stats.num_preemptions
        self._sm_decode.labels(*lb).set(stats.decode_sms)
        self._memory.labels(*lb, "engine").set(stats.memory_bytes)
        self._partitions.stats = stats.partition
        if stats.kv_transfer is not None:
            self._transfers.stats = stats.kv_transfer
            self._prefill_kv_free.labels(*lb).set(stats.kv_transfer.prefill_free_blocks)
            self._prefill_kv_total.labels(*lb).set(stats.kv_transfer.prefill_total_blocks)
            self._memory.labels(*lb, "prefill").set(stats.kv_transfer.prefill_memory_bytes)

    def observe_request(self, stream: RequestStream) -> None:
        """Record a request that has ended (finished, aborted or failed)."""
        times = stream.token_times
        lb = self._labels
        if not times:
            return
        self._prompt_tokens.labels(*lb).inc(stream.num_prompt_tokens)
        self._generation_tokens.labels(*lb).inc(len(times))
        self._ttft.labels(*lb).observe(times[0] - stream.arrival_time)
        itl = self._itl.labels(*lb)
        # A request with n > 1: the gaps between each choice's own tokens (its children's
        # tokens interleave); its TTFT is its first token of any choice, as vLLM's.
        last: dict[int, float] = {}
        for t, choice in zip(times, stream.token_choices):
            if choice in last:
                itl.observe(t - last[choice])
            last[choice] = t
        self._e2e.labels(*lb).observe(times[-1] - stream.arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
