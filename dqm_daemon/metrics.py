"""Prometheus metrics (prometheus-client), in a registry of the application's own.

Counters and histograms are updated where things happen (uploads, inspections); gauges that
describe the catalog are refreshed from it when /metrics is scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Upload durations from a small file on loopback to many GiB over a slow link.
UPLOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
INSPECTION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Agent names come from the clients, and every label value is a series kept for the process's
# life: this many distinct agents get a label of their own, any further ones share OTHER_AGENTS.
MAX_AGENT_LABELS = 500
OTHER_AGENTS = "(other)"


class Metrics:
    def __init__(self) -> None:
        self._agent_labels: set[str] = set()
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.uploads = Counter(
            "dqm_uploads", "Uploads answered, by result (ok, invalid, pending, duplicate, "
            "rejected) and agent", ["result", "agent"], registry=registry)
        self.received_bytes = Counter(
            "dqm_received_bytes", "Bytes of uploads received", registry=registry)
        self.upload_seconds = Histogram(
            "dqm_upload_duration_seconds", "Time from request to answer of an upload",
            buckets=UPLOAD_BUCKETS, registry=registry)
        self.inspection_seconds = Histogram(
            "dqm_inspection_duration_seconds", "Time to inspect one file, by result",
            ["result"], buckets=INSPECTION_BUCKETS, registry=registry)
        self.analysis_seconds = Histogram(
            "dqm_analysis_duration_seconds", "Time to analyse one checked file, by result "
            "(done, failed)", ["result"], buckets=INSPECTION_BUCKETS, registry=registry)
        self.queue_depth = Gauge(
            "dqm_inspection_queue_depth", "Jobs waiting in the inspection queue",
            registry=registry)
        self.uploads_in_flight = Gauge(
            "dqm_uploads_in_flight", "Uploads streaming right now", registry=registry)
        self.free_disk = Gauge(
            "dqm_free_disk_bytes", "Free space in the data directory", registry=registry)
        self.files = Gauge(
            "dqm_files", "Files in the catalog, by state", ["state"], registry=registry)
        self.last_upload = Gauge(
            "dqm_last_upload_timestamp_seconds", "When each agent's last file arrived (unix)",
            ["agent"], registry=registry)

    def agent_label(self, agent: str) -> str:
        """The `agent` label for an agent's series (bounded: see MAX_AGENT_LABELS)."""
        if agent in self._agent_labels:
            return agent
        if len(self._agent_labels) < MAX_AGENT_LABELS:
            self._agent_labels.add(agent)
            return agent
        return OTHER_AGENTS
