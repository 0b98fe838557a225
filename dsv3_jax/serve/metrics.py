"""The server's metrics, rendered in the Prometheus text format (exposition format 0.0.4).

Counters (`inc`), gauges (`set`) and histograms (`observe`), each name prefixed `dsv3_`; a
counter may carry one label set (requests_total{status="stop"}). Thread-safe: the scheduler
thread and the HTTP handlers both write.
"""

from __future__ import annotations

import bisect
import threading

PREFIX = "dsv3_"
# Seconds: time to first token, inter-token latency, queue wait.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
           60.0)
HELP = {
    "requests_total": ("counter", "Requests ended, by how they ended."),
    "prompt_tokens_total": ("counter", "Prompt tokens fed through the model."),
    "generation_tokens_total": ("counter", "Tokens generated."),
    "decode_steps_total": ("counter", "Batched decode steps (one model call each)."),
    "queue_depth": ("gauge", "Requests waiting for a batch slot."),
    "running": ("gauge", "Streams holding a batch slot."),
    "batch_occupancy": ("gauge", "Share of the batch slots in use."),
    "cache_occupancy": ("gauge", "Share of the latent cache's pages given to streams."),
    "draft_tokens_total": ("counter", "MTP drafts verified (speculative decoding)."),
    "accepted_draft_tokens_total": ("counter", "MTP drafts accepted."),
    "acceptance_rate": ("gauge", "accepted_draft_tokens_total / draft_tokens_total."),
    "time_to_first_token_seconds": ("histogram", "From arrival to the first generated token."),
    "inter_token_latency_seconds": ("histogram", "Between consecutive tokens of a stream."),
    "queue_seconds": ("histogram", "From arrival to a batch slot."),
}


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple], float] = {}
        self._gauges: dict[str, float] = {}
        self._hist: dict[str, list] = {}

    def inc(self, name: str, value: float = 1, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + value

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._gauges[name] = float(value)

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            h = self._hist.setdefault(name, [[0] * len(BUCKETS), 0.0, 0])
            i = bisect.bisect_left(BUCKETS, value)  # the first bucket whose bound is >= value
            if i < len(BUCKETS):
                h[0][i] += 1
            h[1] += value
            h[2] += 1

    def value(self, name: str, **labels) -> float:
        """A counter's or gauge's current value (0 when never set)."""
        with self._lock:
            if name in self._gauges:
                return self._gauges[name]
            return self._counters.get((name, tuple(sorted(labels.items()))), 0)

    def render(self) -> str:
        with self._lock:
            lines = []
            for name, (kind, text) in HELP.items():
                full = PREFIX + name
                lines += [f"# HELP {full} {text}", f"# TYPE {full} {kind}"]
                if kind == "counter":
                    series = [(k[1], v) for k, v in self._counters.items() if k[0] == name]
                    for labels, v in sorted(series) or [((), 0)]:
                        tag = ",".join(f'{k}="{val}"' for k, val in labels)
                        lines.append(f"{full}{{{tag}}} {v:g}" if tag else f"{full} {v:g}")
                elif kind == "gauge":
                    lines.append(f"{full} {self._gauges.get(name, 0):g}")
                else:
                    counts, total, n = self._hist.get(name, [[0] * len(BUCKETS), 0.0, 0])
                    running = 0
                    for le, c in zip(BUCKETS, counts):
                        running += c
                        lines.append(f'{full}_bucket{{le="{le:g}"}} {running}')
                    lines += [f'{full}_bucket{{le="+Inf"}} {n}', f"{full}_sum {total:g}",
                              f"{full}_count {n}"]
            return "\n".join(lines) + "\n"
