"""The monitor's newest results (drift checks, re-evaluations, A/B decisions: `peftkit monitor`, stored in
the registry) as Prometheus gauges and as the `monitor` section of /metrics.json, read from the registry
when scraped (at most every CACHE_SECONDS; a registry that is down leaves the last values).

    peftkit_drift_statistic{adapter,version,signal}     the signal's statistic (PSI, MMD², rate change)
    peftkit_drift_threshold{adapter,version,signal}     what it alerts at
    peftkit_drift_alert{adapter,version,signal}         1 while it alerts
    peftkit_reeval_score{adapter,version,metric}        the newest re-evaluated score
    peftkit_reeval_alert{adapter,version}               1 when it fell
    peftkit_ab_rollback{route,version}                  1 when the newest A/B decision was rollback
    peftkit_monitor_checked_timestamp_seconds{kind,adapter,version}
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from ..errors import PeftkitError
from ..registry.watch import Result, latest_results

log = logging.getLogger("peftkit.serve")
CACHE_SECONDS = 5.0
SIGNAL_LABELS = ["adapter", "version", "signal"]


class MonitorCollector:
    """Gauges of the registry's newest monitor results."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry
        self.cached: list[Result] = []
        self.read_at = -CACHE_SECONDS
        self.lock = threading.Lock()

    def latest(self) -> list[Result]:
        with self.lock:
            if time.monotonic() - self.read_at >= CACHE_SECONDS:
                self.read_at = time.monotonic()
                try:
                    self.cached = latest_results(self.registry.db)
                except PeftkitError as e:
                    log.warning("monitor metrics: cannot read the registry (%s); showing the last results", e)
            return self.cached

    def collect(self) -> Iterator[Metric]:
        statistic = GaugeMetricFamily("peftkit_drift_statistic", "the newest drift check's statistic per "
                                      "signal (peftkit monitor drift)", labels=SIGNAL_LABELS)  # fmt: skip
        threshold = GaugeMetricFamily("peftkit_drift_threshold", "the value each drift signal alerts at",
                                      labels=SIGNAL_LABELS)  # fmt: skip
        alert = GaugeMetricFamily(
            "peftkit_drift_alert", "1 while the drift signal alerts", labels=SIGNAL_LABELS
        )
        score = GaugeMetricFamily("peftkit_reeval_score", "the newest re-evaluated score on the gate's eval set",
                                  labels=["adapter", "version", "metric"])  # fmt: skip
        fell = GaugeMetricFamily("peftkit_reeval_alert", "1 when the re-evaluated score fell below its reference",
                                 labels=["adapter", "version"])  # fmt: skip
        rollback = GaugeMetricFamily("peftkit_ab_rollback", "1 when the newest A/B decision on the route was "
                                     "rollback", labels=["route", "version"])  # fmt: skip
        checked = GaugeMetricFamily("peftkit_monitor_checked_timestamp_seconds", "when each monitor result was "
                                    "recorded (Unix time)", labels=["kind", "adapter", "version"])  # fmt: skip
        for r in self.latest():
            checked.add_metric([r.kind, r.name, r.version], r.at)
            if r.kind == "drift":
                for s in r.result.get("signals", []):
                    labels = [r.name, r.version, s["signal"]]
                    statistic.add_metric(labels, s["statistic"])
                    threshold.add_metric(labels, s["threshold"])
                    alert.add_metric(labels, float(s["alert"]))
            elif r.kind == "reeval":
                score.add_metric([r.name, r.version, r.result.get("metric", "")], r.result["score"])
                fell.add_metric([r.name, r.version], float(r.alert))
            elif r.kind == "ab":
                rollback.add_metric([r.name, r.version], float(r.result.get("decision") == "rollback"))
        yield from (statistic, threshold, alert, score, fell, rollback, checked)

    def view(self) -> list[dict[str, Any]]:
        """The newest results for /metrics.json (and the dashboard): kind, adapter, version, time, alert,
        and a short summary."""
        out = []
        for r in self.latest():
            summary: dict[str, Any] = {"kind": r.kind, "adapter": r.name, "version": r.version, "at": r.at,
                                       "alert": r.alert}  # fmt: skip
            if r.kind == "drift":
                summary["signals"] = {s["signal"]: [s["statistic"], s["threshold"], s["alert"]]
                                      for s in r.result.get("signals", [])}  # fmt: skip
            elif r.kind == "reeval":
                summary.update(metric=r.result.get("metric"), score=r.result.get("score"))
            else:
                summary["decision"] = r.result.get("decision")
            out.append(summary)
        return out
