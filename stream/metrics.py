"""Prometheus metrics that every node exports, labelled by node name and role."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LABELS = ("node", "role")

EVENTS_IN = Counter("events_in", "Events received by the node", _LABELS)
EVENTS_OUT = Counter("events_out", "Events sent on an output port", (*_LABELS, "port"))
BATCHES_IN = Counter("batches_in", "Batches received by the node", _LABELS)
BATCHES_OUT = Counter("batches_out", "Batches sent on an output port", (*_LABELS, "port"))
RECORDS_IN = Counter("records_in", "Non-event records received (e.g. snapshots)", _LABELS)
RECORDS_OUT = Counter("records_out", "Non-event records sent", (*_LABELS, "port"))
RECORDS_LOST = Counter(
    "records_lost",
    "Non-event records (e.g. flow snapshots) that could not be delivered",
    (*_LABELS, "port"),
)
RECORDS_RESENT = Counter(
    "records_resent",
    "Records sent again because no receipt from their store confirmed them",
    (*_LABELS, "port"),
)
RECORDS_UNCONFIRMED = Gauge(
    "records_unconfirmed", "Records still without a receipt when the node stopped", _LABELS
)
ACCEPTED = Counter("events_accepted", "Events the node accepted", _LABELS)
REJECTED = Counter("events_rejected", "Events the node rejected by design", _LABELS)
DROPPED = Counter("dropped", "Events lost, by reason", (*_LABELS, "reason"))
BATCH_LATENCY = Histogram(
    "batch_latency_seconds",
    "Time to process one batch",
    _LABELS,
    buckets=(1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
)
QUEUE_DEPTH = Gauge("queue_depth", "Batches received and waiting to be processed", _LABELS)
NODE_UP = Gauge("node_up", "1 while the node's loop runs", _LABELS)
# Labelled by node only, as it was when ``deploy.security`` counted it (dashboards sum by node).
CURVE_REFUSED = Counter(
    "curve_refused", "Peers refused by CURVE authentication (every refusal)", ["node"]
)
NODE_HEALTHY = Gauge(
    "node_healthy", "1 unless outputs have been blocked longer than stall_after_s", _LABELS
)
