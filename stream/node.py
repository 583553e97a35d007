"""The node runtime: lifecycle, the poll loop, back-pressure, heartbeats, metrics and accounting.

A node is given a built worker, a ``Processor`` (consumes messages) or a ``Producer``
(a source), and a ``NodeConfig`` that says where its sockets go. The runtime owns every
socket, so workers never touch the network.

Lifecycle: ``starting`` (sockets, metrics server) -> ``running`` -> ``draining`` (after
SIGTERM/SIGINT, ``request_stop()`` or an exhausted producer: keep receiving until the
inputs have been quiet for ``drain_idle_s``, then ``finish()``) -> ``stopped`` (final
heartbeat, stats file, sockets closed with linger so queued batches still leave).

Accounting: every event that enters is accepted, rejected or dropped with a reason, and
the runtime checks that the three add up for every batch. The runtime itself drops events
holding NaN/inf in a column the schema marks finite (``dropped{reason="nonfinite"}``, one
count per event; the rest of the batch reaches the worker) and frames that do not decode
(``dropped{reason="decode_error"}``: the declared events when ``decode`` could check the
count against the buffers, else one for the frame).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import partial
from typing import Annotated, Any

import msgpack
import numpy as np
import prometheus_client
import pydantic
import zmq

from stream import metrics
from stream.batch import EventBatch, Message, Record
from stream.codec import decode
from stream.durable import write_durably
from stream.errors import FrameError
from stream.protocol import HEARTBEAT_TOPIC, Heartbeat
from stream.receipts import (
    UnconfirmedRecords,
    new_prefix,
    receipt_frames,
    receipt_id,
    record_id,
    stamped,
)
from stream.transport import (
    Endpoint,
    HandshakeWatch,
    SocketOptions,
    check_endpoint,
    open_socket,
    send_message,
)

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class NodeState(StrEnum):
    """Where a node is in its lifecycle."""

    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class Emit:
    """A message to send on a named output port."""

    port: str
    message: Message


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a worker did with one batch: what to send and how its events were counted.

    Event batches among ``emits`` count as accepted events: if the runtime has to drop
    one (a full output with ``drop_when_full``), it moves those events from accepted to
    ``dropped["backpressure"]``.
    """

    emits: tuple[Emit, ...] = ()
    accepted: int = 0
    rejected: int = 0
    dropped: Mapping[str, int] = field(default_factory=dict)

    @property
    def accounted(self) -> int:
        """Events accepted, rejected or dropped."""
        return self.accepted + self.rejected + sum(self.dropped.values())


class Processor(ABC):
    """A worker that consumes messages: L1, HLT, archive, sink."""

    @abstractmethod
    def process(self, message: Message) -> Outcome:
        """Handle one received message. May raise ``FrameError`` for a batch it cannot use."""

    def tick(self, now_s: float) -> Sequence[Emit]:
        """Periodic work between batches (e.g. a timed snapshot). Default: nothing."""
        del now_s
        return ()

    def finish(self) -> Sequence[Emit]:
        """Last messages to send when the node drains (e.g. a final snapshot)."""
        return ()

    def report(self) -> dict[str, Any]:
        """Worker-specific figures for heartbeats and the final stats."""
        return {}


class Producer(ABC):
    """A worker that makes batches: the source."""

    @abstractmethod
    def produce(self) -> Outcome | None:
        """The next batch's outcome, or ``None`` when there is nothing more to make."""

    def wait_s(self, now_s: float) -> float:
        """Seconds until the next batch is due; 0 runs as fast as the outputs take them."""
        del now_s
        return 0.0

    def finish(self) -> Sequence[Emit]:
        """Last messages to send when the node drains."""
        return ()

    def report(self) -> dict[str, Any]:
        """Worker-specific figures for heartbeats and the final stats."""
        return {}


EndpointText = Annotated[str, pydantic.AfterValidator(check_endpoint)]


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=pydantic.ConfigDict(extra="forbid"))
class NodeConfig:
    """Where a node's sockets go and how its loop behaves.

    ``inputs`` connect by default and ``outputs`` bind by default (prefix ``@`` to bind,
    ``>`` to connect). ``control`` is the controller's heartbeat endpoint (connect by
    default). ``metrics_port`` 0 picks a free port, ``None`` serves no metrics.
    ``output_peers`` > 0 holds the node in ``starting`` until every output has completed
    that many peer handshakes (at most ``peer_wait_s``), so that the first batches are
    spread over all downstream nodes instead of going to whichever connected first.
    With ``socket.curve`` the outputs are CURVE servers, and every peer they refuse (by
    the ZAP handler or inside libzmq) is counted in ``curve_refused_total{node}`` and in
    ``NodeStats.curve_refused`` by reason.

    Records (flow snapshots) are delivered with receipts (``stream.receipts``) when the
    consumer binds ``receipts_to`` and its producers connect ``receipts_from`` to it: a
    producer sends a record again after ``resend_unconfirmed_s`` without a receipt, and
    at its stop waits up to ``stall_after_s`` for the last ones. With CURVE the receipts
    socket is a server like the outputs, and its clients need ``receipts_server_key``
    (the consumer's public key): a forged receipt would make a producer forget a record.
    """

    name: Annotated[str, pydantic.Field(min_length=1)]
    role: str
    inputs: tuple[EndpointText, ...] = ()
    outputs: Mapping[str, EndpointText] = field(default_factory=dict)
    control: EndpointText | None = None
    metrics_port: Annotated[int, pydantic.Field(ge=0, le=65535)] | None = None
    metrics_host: str = "127.0.0.1"
    heartbeat_interval_s: Annotated[float, pydantic.Field(gt=0)] = 1.0
    drain_idle_s: Annotated[float, pydantic.Field(ge=0)] = 1.0
    stall_after_s: Annotated[float, pydantic.Field(gt=0)] = 10.0
    max_queue_batches: Annotated[int, pydantic.Field(ge=1)] = 4
    drop_when_full: bool = False
    socket: SocketOptions = field(default_factory=SocketOptions)
    stats_path: str | None = None
    output_peers: Annotated[int, pydantic.Field(ge=0)] = 0
    peer_wait_s: Annotated[float, pydantic.Field(ge=0)] = 10.0
    receipts_from: tuple[EndpointText, ...] = ()
    receipts_to: EndpointText | None = None
    receipts_server_key: bytes | None = None
    resend_unconfirmed_s: Annotated[float, pydantic.Field(gt=0)] = 5.0


class LatencyReservoir:
    """The most recent batch latencies, for percentiles in heartbeats and reports."""

    def __init__(self, size: int = 4096) -> None:
        self._values = np.zeros(size)
        self._count = 0

    def add(self, seconds: float) -> None:
        self._values[self._count % self._values.size] = seconds
        self._count += 1

    def summary(self) -> dict[str, float]:
        """Count, mean, p50 and p99 in seconds over the kept window."""
        kept = self._values[: min(self._count, self._values.size)]
        if kept.size == 0:
            return {"count": 0}
        p50, p99 = np.percentile(kept, [50, 99])
        return {"count": self._count, "mean_s": kept.mean(), "p50_s": p50, "p99_s": p99}


def weight_sums(batch: EventBatch) -> tuple[float, float]:
    """Sum of the events' truth weights and of their squares (no ``weight``: 1 each;
    non-finite weights count as 0)."""
    weight = batch.truth.get("weight")
    if weight is None:
        return float(len(batch)), float(len(batch))
    w = weight.astype(np.float64)
    w = w[np.isfinite(w)]
    return float(w.sum()), float(np.square(w).sum())


@dataclass(slots=True)
class NodeStats:
    """Plain counters mirrored into Prometheus; the source of truth for accounting.

    Beside the exact event counts, ``weight_in`` and ``weight_out[port]`` hold (sum of w,
    sum of w^2) of the events received (for a source: made) and sent, from their truth
    ``weight`` (1 where a batch has none); rates in Hz follow from them (see
    ``nodes.source``). They never enter the accounting.
    """

    events_in: int = 0
    batches_in: int = 0
    records_in: int = 0
    accepted: int = 0
    rejected: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    curve_refused: Counter[str] = field(default_factory=Counter)
    events_out: Counter[str] = field(default_factory=Counter)
    batches_out: Counter[str] = field(default_factory=Counter)
    records_out: Counter[str] = field(default_factory=Counter)
    records_lost: Counter[str] = field(default_factory=Counter)
    records_resent: Counter[str] = field(default_factory=Counter)
    records_unconfirmed: int = 0
    latency: LatencyReservoir = field(default_factory=LatencyReservoir)
    busy_s: float = 0.0
    blocked_s: float = 0.0
    first_in_s: float | None = None
    last_in_s: float | None = None
    weight_in: list[float] = field(default_factory=lambda: [0.0, 0.0])
    weight_out: dict[str, list[float]] = field(default_factory=dict)

    def add_weight_out(self, port: str, sums: tuple[float, float]) -> None:
        total = self.weight_out.setdefault(port, [0.0, 0.0])
        total[0] += sums[0]
        total[1] += sums[1]

    @property
    def balanced(self) -> bool:
        """Whether in = accepted + rejected + dropped."""
        return self.events_in == self.accepted + self.rejected + sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "events_in": self.events_in,
            "batches_in": self.batches_in,
            "records_in": self.records_in,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "dropped": dict(self.dropped),
            "curve_refused": dict(self.curve_refused),
            "events_out": dict(self.events_out),
            "batches_out": dict(self.batches_out),
            "records_out": dict(self.records_out),
            "records_lost": dict(self.records_lost),
            "records_resent": dict(self.records_resent),
            "records_unconfirmed": self.records_unconfirmed,
            "latency": self.latency.summary(),
            "busy_s": self.busy_s,
            "blocked_s": self.blocked_s,
            "first_in_s": self.first_in_s,
            "last_in_s": self.last_in_s,
            "weight_in": list(self.weight_in),
            "weight_out": {port: list(sums) for port, sums in self.weight_out.items()},
            "balanced": self.balanced,
        }


class Node:
    """Runs one worker inside the node lifecycle; ``run()`` blocks until the node stops.

    ``request_stop()`` is safe from any thread; in the main thread SIGTERM and SIGINT
    call it too. A graceful stop loses no batch that reached this node: everything
    queued is processed and every output is flushed (bounded by ``linger_ms``).
    """

    def __init__(
        self,
        config: NodeConfig,
        worker: Processor | Producer,
        *,
        clock: Clock = time.monotonic,
        context: zmq.Context | None = None,
        extra_report: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self.worker = worker
        self.stats = NodeStats()
        self.state = NodeState.STARTING
        self.metrics_port: int | None = None
        self._clock = clock
        self._context = context
        self._stop = threading.Event()
        self._started = threading.Event()
        self._labels = {"node": config.name, "role": config.role}
        self._queue: deque[list[zmq.Frame]] = deque()
        self._heartbeat_seq = 0
        self._t0 = clock()
        self._error_kinds: set[str] = set()
        self._extra_report = extra_report
        self._record_prefix = new_prefix(config.name)
        self._records_sent = 0
        self._unconfirmed = UnconfirmedRecords(config.resend_unconfirmed_s)
        self._stalled_ports: set[str] = set()

    # -- control -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the node to drain and stop."""
        self._stop.set()

    def wait_started(self, timeout_s: float | None = None) -> bool:
        """Block until the sockets are up and the loop runs."""
        return self._started.wait(timeout_s)

    # -- lifecycle -----------------------------------------------------------------------

    def run(self) -> NodeStats:
        """Start, loop, drain, stop; returns the final counters."""
        restore = self._install_signal_handlers()
        ctx = self._context or zmq.Context()
        server = None
        try:
            server = self._start_metrics()
            with self._open_sockets(ctx) as sockets:
                self._await_peers(sockets)
                self._set_state(NodeState.RUNNING, sockets)
                self._started.set()
                if isinstance(self.worker, Producer):
                    self._produce_loop(sockets)
                else:
                    self._consume_loop(sockets)
                self._set_state(NodeState.DRAINING, sockets)
                for emit in self.worker.finish():
                    self._send(sockets, emit, final=True)
                self._await_receipts(sockets)
                self._set_state(NodeState.STOPPED, sockets)
                self._write_stats()
        finally:
            metrics.NODE_UP.labels(**self._labels).set(0)
            if server is not None:
                server.shutdown()
                server.server_close()
            if self._context is None:
                ctx.term()
            restore()
        return self.stats

    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum: int, frame: object) -> None:
            del frame
            log.info("%s: signal %d, draining", self.config.name, signum)
            self.request_stop()

        for sig in previous:
            signal.signal(sig, handler)

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore

    def _start_metrics(self) -> Any:
        if self.config.metrics_port is None:
            return None
        server, _ = prometheus_client.start_http_server(
            self.config.metrics_port, addr=self.config.metrics_host
        )
        self.metrics_port = server.server_port
        log.info(
            "%s: metrics on http://%s:%d/metrics",
            self.config.name,
            self.config.metrics_host,
            self.metrics_port,
        )
        return server

    def _open_sockets(self, ctx: zmq.Context) -> _Sockets:
        cfg = self.config
        sockets = _Sockets()
        try:
            if cfg.inputs:
                endpoints = [Endpoint.parse(e, bind=False) for e in cfg.inputs]
                sockets.inputs = open_socket(ctx, zmq.PULL, endpoints, cfg.socket)
            # Outputs are watched to wait for their peers and, with CURVE (they are its
            # servers), to count every peer they refuse.
            watch = cfg.output_peers > 0 or cfg.socket.curve is not None
            for port, text in cfg.outputs.items():
                endpoint = Endpoint.parse(text, bind=True)
                prepare = partial(sockets.watch, port) if watch else None
                sockets.outputs[port] = open_socket(
                    ctx, zmq.PUSH, [endpoint], cfg.socket, prepare=prepare
                )
            if cfg.control:
                endpoint = Endpoint.parse(cfg.control, bind=False)
                control_options = SocketOptions(sndhwm=100, rcvhwm=100, linger_ms=500)
                sockets.control = open_socket(ctx, zmq.PUB, [endpoint], control_options)
                sockets.keepalive = _Keepalive(ctx, endpoint, cfg.heartbeat_interval_s)
            if cfg.receipts_from:
                endpoints = [Endpoint.parse(e, bind=False) for e in cfg.receipts_from]
                curve = cfg.socket.curve
                if curve is not None:
                    curve = replace(curve, server_public_key=cfg.receipts_server_key)
                options = SocketOptions(curve=curve)
                sockets.receipts_in = open_socket(ctx, zmq.SUB, endpoints, options)
                sockets.receipts_in.setsockopt(zmq.SUBSCRIBE, self._record_prefix.encode())
            if cfg.receipts_to:
                endpoint = Endpoint.parse(cfg.receipts_to, bind=True)
                options = SocketOptions(curve=cfg.socket.curve)
                prepare = partial(sockets.watch, "receipts") if cfg.socket.curve else None
                sockets.receipts_out = open_socket(
                    ctx, zmq.PUB, [endpoint], options, prepare=prepare
                )
        except zmq.ZMQError:
            sockets.close()
            raise
        return sockets

    def _await_peers(self, sockets: _Sockets) -> None:
        """Wait (heartbeating) until each output has ``output_peers`` handshakes."""
        cfg = self.config
        try:
            deadline = self._clock() + cfg.peer_wait_s
            next_heartbeat = self._clock()
            while cfg.output_peers > 0 and not self._stop.is_set():
                self._check_handshakes(sockets)
                short = [p for p in cfg.outputs if sockets.peers[p] < cfg.output_peers]
                if not short:
                    break
                now = self._clock()
                if now >= deadline:
                    for port in short:
                        log.warning(
                            "%s: output %r has %d of %d peers after %.0f s; going on",
                            cfg.name,
                            port,
                            sockets.peers[port],
                            cfg.output_peers,
                            cfg.peer_wait_s,
                        )
                    break
                if now >= next_heartbeat:
                    self._heartbeat(sockets)
                    next_heartbeat = now + cfg.heartbeat_interval_s
                sockets.monitors[short[0]].poll(100)
        finally:
            if cfg.socket.curve is None:
                sockets.close_monitors()

    def _check_handshakes(self, sockets: _Sockets) -> None:
        """Read the outputs' handshake monitors: count peers, and refused CURVE peers.

        Runs with every heartbeat, so a refusal is counted within one heartbeat interval
        and before the final stats are written.
        """
        for port, monitor in sockets.monitors.items():
            succeeded, refused = monitor.drain()
            sockets.peers[port] += succeeded
            if self.config.socket.curve is None:
                continue
            for reason in refused:
                self.stats.curve_refused[reason] += 1
                metrics.CURVE_REFUSED.labels(node=self.config.name).inc()
                self._log_once(
                    f"curve:{reason}",
                    "%s: output %r refused a CURVE peer (%s)",
                    self.config.name,
                    port,
                    reason,
                )

    def _set_state(self, state: NodeState, sockets: _Sockets) -> None:
        self.state = state
        log.info("%s: %s", self.config.name, state.value)
        metrics.NODE_UP.labels(**self._labels).set(state is not NodeState.STOPPED)
        metrics.NODE_HEALTHY.labels(**self._labels).set(state is not NodeState.STOPPED)
        self._heartbeat(sockets)

    # -- loops ---------------------------------------------------------------------------

    def _consume_loop(self, sockets: _Sockets) -> None:
        cfg = self.config
        assert isinstance(self.worker, Processor)
        assert sockets.inputs is not None, "a processor node needs inputs"
        poller = zmq.Poller()
        poller.register(sockets.inputs, zmq.POLLIN)
        next_heartbeat = self._clock() + cfg.heartbeat_interval_s
        last_input = self._clock()
        draining = False
        while True:
            now = self._clock()
            if self._stop.is_set() and not draining:
                draining = True
                self._set_state(NodeState.DRAINING, sockets)
            if now >= next_heartbeat:
                self._heartbeat(sockets)
                self._resend_unconfirmed(sockets)
                next_heartbeat = now + cfg.heartbeat_interval_s
            wait_ms = 0 if self._queue else max(0, int((next_heartbeat - now) * 1000))
            if draining:
                wait_ms = min(wait_ms, 50)
            if len(self._queue) < cfg.max_queue_batches and poller.poll(wait_ms):
                while len(self._queue) < cfg.max_queue_batches:
                    try:
                        self._queue.append(sockets.inputs.recv_multipart(zmq.NOBLOCK, copy=False))
                    except zmq.Again:
                        break
                last_input = self._clock()
            metrics.QUEUE_DEPTH.labels(**self._labels).set(len(self._queue))
            if self._queue:
                self._handle(sockets, self._queue.popleft())
            for emit in self.worker.tick(self._clock()):
                self._send(sockets, emit)
            idle_s = self._clock() - last_input
            if draining and not self._queue and idle_s >= cfg.drain_idle_s:
                return

    def _produce_loop(self, sockets: _Sockets) -> None:
        cfg = self.config
        assert isinstance(self.worker, Producer)
        next_heartbeat = self._clock() + cfg.heartbeat_interval_s
        while not self._stop.is_set():
            now = self._clock()
            if now >= next_heartbeat:
                self._heartbeat(sockets)
                self._resend_unconfirmed(sockets)
                next_heartbeat = now + cfg.heartbeat_interval_s
            wait_s = self.worker.wait_s(now)
            if wait_s > 0:
                self._stop.wait(min(wait_s, next_heartbeat - now, 0.1))
                continue
            t0 = self._clock()
            outcome = self.worker.produce()
            if outcome is None:
                log.info("%s: producer exhausted", cfg.name)
                return
            for emit in outcome.emits:
                if isinstance(emit.message, EventBatch):
                    w_made = weight_sums(emit.message)
                    self.stats.weight_in[0] += w_made[0]
                    self.stats.weight_in[1] += w_made[1]
            self._account(outcome, n_in=outcome.accounted, t0=t0, sockets=sockets)

    # -- one message ---------------------------------------------------------------------

    def _handle(self, sockets: _Sockets, frames: list[zmq.Frame]) -> None:
        t0 = self._clock()
        try:
            message = decode(frames, check_finite=False)
        except FrameError as exc:
            self._drop_unreadable(exc)
            return
        if not isinstance(message, EventBatch):
            self.stats.records_in += 1
            metrics.RECORDS_IN.labels(**self._labels).inc()
            outcome = self._run_worker(message, n_events=0)
            if not outcome.dropped:  # one the worker failed on stays unconfirmed
                self._confirm(sockets, message)
            self._account(outcome, n_in=0, t0=t0, sockets=sockets)
            return
        n = len(message)
        w_in = weight_sums(message)
        self.stats.weight_in[0] += w_in[0]
        self.stats.weight_in[1] += w_in[1]
        self.stats.batches_in += 1
        metrics.BATCHES_IN.labels(**self._labels).inc()
        # One event with NaN/inf costs that event only: the rest of the batch (truth rows
        # with it) goes on to the worker.
        finite = message.finite_rows()
        n_nonfinite = n - int(finite.sum())
        if n_nonfinite:
            self._log_once(
                "nonfinite",
                "%s: dropped %d of %d events with NaN/inf",
                self.config.name,
                n_nonfinite,
                n,
            )
            message = message.select(finite)
        if n_nonfinite < n or n == 0:
            outcome = self._run_worker(message, n_events=n - n_nonfinite)
        else:
            outcome = Outcome()
        if n_nonfinite:
            dropped = Counter(outcome.dropped)
            dropped["nonfinite"] += n_nonfinite
            outcome = replace(outcome, dropped=dropped)
        self._account(outcome, n_in=n, t0=t0, sockets=sockets)

    def _run_worker(self, message: Message, n_events: int) -> Outcome:
        assert isinstance(self.worker, Processor)
        try:
            return self.worker.process(message)
        except FrameError as exc:
            self._log_once(
                exc.reason, "%s: dropped batch of %d: %s", self.config.name, n_events, exc
            )
            return Outcome(dropped={exc.reason: n_events})
        except Exception:  # a worker bug on one batch must not stop the node
            self._log_once(
                "processing_error",
                "%s: worker failed on a batch of %d",
                self.config.name,
                n_events,
                exc_info=True,
            )
            return Outcome(dropped={"processing_error": n_events})

    def _drop_unreadable(self, exc: FrameError) -> None:
        # ``decode`` reports an event count only once the buffers have been shown to hold
        # it; any other bad frame counts as one event in and one dropped, so that a forged
        # header cannot move the books by more than that.
        n = max(exc.n_events, 1)
        self.stats.events_in += n
        self.stats.dropped["decode_error"] += n
        metrics.EVENTS_IN.labels(**self._labels).inc(n)
        metrics.DROPPED.labels(**self._labels, reason="decode_error").inc(n)
        self._log_once(f"frame:{exc.reason}", "%s: dropped a frame: %s", self.config.name, exc)

    def _account(self, outcome: Outcome, *, n_in: int, t0: float, sockets: _Sockets) -> None:
        stats, labels = self.stats, self._labels
        dropped = Counter(outcome.dropped)
        accepted = outcome.accepted
        if outcome.accounted != n_in:
            self._log_once(
                "accounting",
                "%s: worker accounted for %d of %d events",
                self.config.name,
                outcome.accounted,
                n_in,
                level=logging.ERROR,
            )
            dropped["accounting_error"] += n_in - outcome.accounted
        # Latency is the work on the batch; time blocked on full outputs is back-pressure,
        # kept apart in ``blocked_s``.
        elapsed = self._clock() - t0
        for emit in outcome.emits:
            if not self._send(sockets, emit) and isinstance(emit.message, EventBatch):
                accepted -= len(emit.message)
                dropped["backpressure"] += len(emit.message)
        stats.blocked_s += self._clock() - t0 - elapsed
        stats.events_in += n_in
        if n_in:
            stats.first_in_s = t0 if stats.first_in_s is None else stats.first_in_s
            stats.last_in_s = t0
        stats.accepted += accepted
        stats.rejected += outcome.rejected
        stats.dropped.update(dropped)
        metrics.EVENTS_IN.labels(**labels).inc(n_in)
        metrics.ACCEPTED.labels(**labels).inc(accepted)
        metrics.REJECTED.labels(**labels).inc(outcome.rejected)
        for reason, count in dropped.items():
            metrics.DROPPED.labels(**labels, reason=reason).inc(count)
        stats.busy_s += elapsed
        stats.latency.add(elapsed)
        metrics.BATCH_LATENCY.labels(**labels).observe(elapsed)

    def _send(self, sockets: _Sockets, emit: Emit, *, final: bool = False) -> bool:
        """Send one emit, blocking under back-pressure but still heartbeating.

        Returns ``False`` when the message was dropped: at once with ``drop_when_full``,
        or after ``stall_after_s`` of back-pressure while draining. Once a port has
        stalled that long while draining, its later messages are dropped at once: its
        readers are gone, and waiting again per message would hold the node for minutes.
        """
        sock = sockets.outputs.get(emit.port)
        if sock is None:
            msg = f"node {self.config.name!r} has no output port {emit.port!r}"
            raise KeyError(msg)
        cfg = self.config
        if sockets.receipts_in is not None and isinstance(emit.message, Record):
            if record_id(emit.message) is None:
                self._records_sent += 1
                stamp = f"{self._record_prefix}{self._records_sent}"
                emit = replace(emit, message=stamped(emit.message, stamp))
        blocked_since = self._clock()
        stopping = final or self._stop.is_set()
        dead = stopping and emit.port in self._stalled_ports
        timeout_ms = 0 if cfg.drop_when_full or dead else int(cfg.heartbeat_interval_s * 1000)
        while not send_message(sock, emit.message, timeout_ms=timeout_ms):
            blocked_s = self._clock() - blocked_since
            stalled = blocked_s > cfg.stall_after_s
            metrics.NODE_HEALTHY.labels(**self._labels).set(not stalled)
            stopping = final or self._stop.is_set()
            if cfg.drop_when_full or dead or (stalled and stopping):
                if stalled or dead:
                    self._stalled_ports.add(emit.port)
                self._log_once(
                    f"full:{emit.port}", "%s: output %r full, dropping", cfg.name, emit.port
                )
                if not isinstance(emit.message, EventBatch):  # batches: the caller counts
                    self.stats.records_lost[emit.port] += 1
                    metrics.RECORDS_LOST.labels(**self._labels, port=emit.port).inc()
                    log.error(
                        "%s: a %s record could not be delivered on %r (counted as lost)",
                        cfg.name,
                        getattr(emit.message, "kind", "?"),
                        emit.port,
                    )
                return False
            self._heartbeat(sockets)
        metrics.NODE_HEALTHY.labels(**self._labels).set(1)
        if isinstance(emit.message, EventBatch):
            n = len(emit.message)
            self.stats.add_weight_out(emit.port, weight_sums(emit.message))
            self.stats.events_out[emit.port] += n
            self.stats.batches_out[emit.port] += 1
            metrics.EVENTS_OUT.labels(**self._labels, port=emit.port).inc(n)
            metrics.BATCHES_OUT.labels(**self._labels, port=emit.port).inc()
        else:
            self.stats.records_out[emit.port] += 1
            metrics.RECORDS_OUT.labels(**self._labels, port=emit.port).inc()
            if sockets.receipts_in is not None:
                self._unconfirmed.sent(emit.port, emit.message, self._clock())
        return True

    # -- reporting -----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Counters and worker figures as plain data (heartbeats and the stats file).

        ``cpu_s`` is this process's CPU time; ``first_in_s``/``last_in_s`` are node-clock
        times of the first and last batch with events; ``curve_refused`` counts the peers
        the CURVE outputs refused, by reason (``stream.transport.refusal_reason``);
        ``extra`` comes from the ``extra_report`` hook.
        """
        body = {
            **self.stats.to_dict(),
            "queue_depth": len(self._queue),
            "cpu_s": time.process_time(),
            "worker": self.worker.report(),
        }
        if self._extra_report is not None:
            body["extra"] = self._extra_report()
        return body

    def _heartbeat(self, sockets: _Sockets) -> None:
        self._check_handshakes(sockets)
        self._read_receipts(sockets)
        if sockets.control is None:
            return
        self._heartbeat_seq += 1
        beat = Heartbeat(
            name=self.config.name,
            role=self.config.role,
            state=self.state.value,
            seq=self._heartbeat_seq,
            uptime_s=self._clock() - self._t0,
            stats=self.snapshot(),
            metrics_port=self.metrics_port,
        )
        frames = beat.to_frames()
        try:
            sockets.control.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            log.debug("%s: heartbeat dropped (control queue full)", self.config.name)
        if sockets.keepalive is not None:
            sockets.keepalive.update(frames[1])

    # -- receipts ------------------------------------------------------------------------

    def _confirm(self, sockets: _Sockets, record: Record) -> None:
        """Publish the receipt of a record this node has handled (stored or refused)."""
        stored_id = record_id(record)
        if sockets.receipts_out is None or stored_id is None:
            return
        try:
            sockets.receipts_out.send_multipart(receipt_frames(stored_id), zmq.NOBLOCK)
        except zmq.Again:  # the producer sends the record again and is confirmed then
            log.debug("%s: receipt of %s dropped (queue full)", self.config.name, stored_id)

    def _read_receipts(self, sockets: _Sockets) -> None:
        if sockets.receipts_in is None:
            return
        while True:
            try:
                frames = sockets.receipts_in.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            stored_id = receipt_id(frames)
            if stored_id is not None:
                self._unconfirmed.discard(stored_id)

    def _resend_unconfirmed(self, sockets: _Sockets) -> None:
        """Send again the records that no receipt confirmed within resend_unconfirmed_s
        (their consumer died with them, or the receipt was lost; it drops duplicates)."""
        for port, record in self._unconfirmed.due(self._clock()):
            if self._send(sockets, Emit(port, record)):
                self.stats.records_resent[port] += 1
                metrics.RECORDS_RESENT.labels(**self._labels, port=port).inc()
            else:  # counted in records_lost by _send
                self._unconfirmed.discard(str(record_id(record)))

    def _await_receipts(self, sockets: _Sockets) -> None:
        """At the stop: wait up to stall_after_s, resending, until every record sent is
        confirmed; count the rest as unconfirmed (sent, perhaps stored, never confirmed)."""
        if sockets.receipts_in is None:
            return
        deadline = self._clock() + self.config.stall_after_s
        while self._unconfirmed and self._clock() < deadline:
            sockets.receipts_in.poll(int(self.config.heartbeat_interval_s * 1000))
            self._heartbeat(sockets)
            self._resend_unconfirmed(sockets)
        left = len(self._unconfirmed) + self._unconfirmed.given_up
        self.stats.records_unconfirmed = left
        if left:
            metrics.RECORDS_UNCONFIRMED.labels(**self._labels).set(left)
            log.error(
                "%s: %d record(s) sent without a receipt from their store (counted as unconfirmed)",
                self.config.name,
                left,
            )

    def _write_stats(self) -> None:
        if self.config.stats_path is None:
            return
        body = {"name": self.config.name, "role": self.config.role, **self.snapshot()}
        write_durably(self.config.stats_path, json.dumps(body, indent=2, default=float).encode())

    def _log_once(
        self,
        kind: str,
        fmt: str,
        *args: object,
        level: int = logging.WARNING,
        exc_info: bool = False,
    ) -> None:
        """Log the first occurrence of each kind of problem loudly, the rest at debug."""
        first = kind not in self._error_kinds
        self._error_kinds.add(kind)
        log.log(level if first else logging.DEBUG, fmt, *args, exc_info=exc_info)


class _Keepalive:
    """Repeats a node's last heartbeat, from its own thread and socket, while the event
    loop is held in one long call (a flow-averaging round waiting out a dead peer, say):
    heartbeats then stop only when the process stops or dies. The repeats carry
    ``stats["loop_age_s"]``, the time since the loop's own last heartbeat."""

    def __init__(self, ctx: zmq.Context, endpoint: Endpoint, interval_s: float) -> None:
        options = SocketOptions(sndhwm=10, rcvhwm=10, linger_ms=0)
        self._sock = open_socket(ctx, zmq.PUB, [endpoint], options)
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._body: bytes | None = None
        self._sent_s = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="keepalive", daemon=True)
        self._thread.start()

    def update(self, body: bytes) -> None:
        """The loop sent a heartbeat (its msgpack body)."""
        with self._lock:
            self._body, self._sent_s = body, time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            with self._lock:
                body, sent_s = self._body, self._sent_s
            age_s = time.monotonic() - sent_s
            if body is None or age_s < 1.5 * self._interval_s:
                continue
            beat = msgpack.unpackb(body, raw=False)
            beat["uptime_s"] += age_s
            beat["stats"]["loop_age_s"] = age_s
            try:
                self._sock.send_multipart([HEARTBEAT_TOPIC, msgpack.packb(beat)], zmq.NOBLOCK)
            except zmq.Again:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


@dataclass(slots=True)
class _Sockets:
    inputs: zmq.Socket | None = None
    outputs: dict[str, zmq.Socket] = field(default_factory=dict)
    control: zmq.Socket | None = None
    keepalive: _Keepalive | None = None
    receipts_in: zmq.Socket | None = None
    receipts_out: zmq.Socket | None = None
    monitors: dict[str, HandshakeWatch] = field(default_factory=dict)
    peers: Counter[str] = field(default_factory=Counter)

    def watch(self, port: str, sock: zmq.Socket) -> None:
        """Attach a handshake monitor to an output before it binds (see ``_await_peers``)."""
        self.monitors[port] = HandshakeWatch(sock)

    def close_monitors(self) -> None:
        for monitor in self.monitors.values():
            monitor.close()
        self.monitors.clear()

    def __enter__(self) -> _Sockets:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close outputs with their linger (so queued batches leave) and the rest at once."""
        self.close_monitors()
        if self.inputs is not None:
            self.inputs.close(linger=0)
        for sock in self.outputs.values():
            sock.close()
        if self.control is not None:
            self.control.close()
        if self.keepalive is not None:
            self.keepalive.close()
        for receipts in (self.receipts_in, self.receipts_out):
            if receipts is not None:
                receipts.close(linger=0)
