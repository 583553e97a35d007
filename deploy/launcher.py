"""The farm launcher: a topology becomes one process per node, wired over ZeroMQ TCP.

``plan_farm`` turns a topology into ``NodePlan``s (names, endpoints, keys, run settings);
``run_node`` runs one plan in the current process (``trigfarm node`` and every child of
the launcher); ``Farm`` starts the children with ``spawn``, follows their heartbeats on
a control socket, and stops them in stages.

Start order: every consumer first, the source last once all consumers report
``running`` (so that start-up time is not counted as back-pressure). Staged stop: the
source finishes (its event budget, ``--duration``, Ctrl-C or SIGTERM), then each stage in
chain order is told to drain (SIGTERM) only once the stage before it has exited, so every
batch in flight is processed and the archive flushes last. A second signal, or
``stop_deadline_s`` after the first, kills.

Faults (the zguide's Paranoid Pirate): a node whose heartbeats stop for
``stall_after_s`` is killed. A dead node of a stage that has survivors is taken out (the
sockets route its share to them; the stage is reported degraded, with the events it took
with it estimated from its last heartbeat). A stage left with no live node is restarted,
up to ``restarts`` times per node (upstream nodes hold what they cannot deliver meanwhile);
after that, the run stops in stages.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import resource_tracker
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import zmq

from deploy import security
from deploy.roles import ROLES, LaunchContext
from deploy.topology import StageSpec, Topology, TopologyError
from stream.durable import write_durably
from stream.errors import FrameError
from stream.node import Node, NodeConfig
from stream.protocol import HEARTBEAT_TOPIC, Heartbeat
from stream.transport import CurveKeys, SocketOptions, free_tcp_port

log = logging.getLogger(__name__)

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

THREAD_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
)


class FarmError(RuntimeError):
    """The farm could not run: a node failed to start or never reported running."""


@dataclass(frozen=True, slots=True)
class NodePlan:
    """Everything a node process needs: picklable, built by the launcher or ``trigfarm node``."""

    stage: StageSpec
    node: NodeConfig
    launch: LaunchContext
    threads: int = 1
    allowed_clients: tuple[bytes, ...] = ()
    log_level: int = logging.WARNING


@dataclass(frozen=True, slots=True)
class FarmPlan:
    """All nodes of a farm, with resolved ports, in chain order."""

    topology: Topology
    nodes: tuple[NodePlan, ...]
    out_dir: str
    control: str

    def stage_nodes(self, stage: str) -> list[NodePlan]:
        return [n for n in self.nodes if n.stage.name == stage]


def _resolve_ports(topology: Topology, *, fixed: bool) -> dict[str, int]:
    ports: dict[str, int] = {}
    for stage in topology.stages:
        role = ROLES[stage.role]
        if role.output_port is None and not role.stores_records:
            continue
        if stage.port == 0 and fixed:
            serves = "its receipts" if role.output_port is None else "its outputs"
            raise TopologyError(
                key=f"topology.{stage.name}.port",
                problem=f"needs a fixed port for {serves} to run nodes on separate hosts",
            )
        ports[stage.name] = stage.port
    return ports


def plan_farm(
    topology: Topology,
    *,
    out_dir: str | Path,
    events: int = 0,
    control: str = "",
    fixed_ports: bool = False,
    log_level: int = logging.WARNING,
) -> FarmPlan:
    """Resolve a topology into node plans.

    Ports 0 are replaced by free ports on this host unless ``fixed_ports`` (one node
    per host, ``trigfarm node``), where they are an error.

    Raises:
        TopologyError: a missing port or key file (names the key).
    """
    out = str(Path(out_dir).resolve())
    base_ports = _resolve_ports(topology, fixed=fixed_ports)
    endpoints: dict[str, list[tuple[str, str]]] = {}  # stage -> [(bind url, connect url)]
    for stage in topology.stages:
        if stage.name not in base_ports:
            continue
        pairs = []
        for i in range(stage.count):
            port = base_ports[stage.name] + i if base_ports[stage.name] else free_tcp_port()
            pairs.append((f"tcp://{stage.bind_host(i)}:{port}", f"tcp://{stage.host(i)}:{port}"))
        endpoints[stage.name] = pairs
    farm = topology.farm
    plans = []
    metrics_index = 0
    for stage in topology.stages:
        role = ROLES[stage.role]
        rendezvous = _rendezvous(stage, fixed=fixed_ports)
        _check_averaging_timeout(stage, farm.stall_after_s)
        upstream = topology.upstream(stage.name)
        downstream = topology.downstream(stage.name)
        keys = _keys(topology, stage, upstream)
        # A store (the archive) binds a receipts socket for the stage before it; with CURVE
        # that socket is a server admitting that stage's key, as an output admits the next.
        stores = role.stores_records and upstream is not None
        receipts_from: tuple[str, ...] = ()
        receipts_server_key: bytes | None = None
        if downstream is not None and ROLES[downstream.role].stores_records:
            receipts_from = tuple(f">{url}" for _, url in endpoints[downstream.name])
            if topology.security.curve:
                receipts_server_key = security.load_public(topology.keys_dir(), downstream.name)
        allowed: tuple[bytes, ...] = ()
        if topology.security.curve:
            clients = [downstream] if downstream is not None else []
            clients += [upstream] if stores and upstream is not None else []
            allowed = tuple(security.load_public(topology.keys_dir(), s.name) for s in clients)
        for i, name in enumerate(stage.node_names()):
            inputs = (
                tuple(f">{url}" for _, url in endpoints.get(upstream.name, [])) if upstream else ()
            )
            outputs = {}
            if role.output_port is not None and downstream is not None:
                outputs[role.output_port] = f"@{endpoints[stage.name][i][0]}"
            metrics_port: int | None = None
            if topology.metrics.enabled:
                base = topology.metrics.base_port
                metrics_port = base + metrics_index if base else 0
            metrics_index += 1
            node = NodeConfig(
                name=name,
                role=stage.role,
                inputs=inputs,
                outputs=outputs,
                control=f">{control}" if control else None,
                metrics_port=metrics_port,
                metrics_host=topology.metrics.host,
                heartbeat_interval_s=farm.heartbeat_interval_s,
                drain_idle_s=farm.drain_idle_s,
                stall_after_s=farm.stall_after_s,
                max_queue_batches=stage.max_queue_batches,
                drop_when_full=stage.drop_when_full,
                socket=SocketOptions(
                    sndhwm=farm.sndhwm,
                    rcvhwm=farm.rcvhwm,
                    linger_ms=int(farm.linger_s * 1000),
                    curve=keys,
                    kernel_buffer_bytes=farm.socket_buffer_kib * 1024,
                ),
                stats_path=f"{out}/nodes/{name}.json",
                output_peers=downstream.count if outputs and downstream else 0,
                peer_wait_s=farm.peer_wait_s,
                receipts_from=receipts_from,
                receipts_to=f"@{endpoints[stage.name][i][0]}" if stores else None,
                receipts_server_key=receipts_server_key,
            )
            launch = LaunchContext(
                name=name,
                index=i,
                out_dir=out,
                events=events,
                threads=stage.threads,
                rendezvous=rendezvous,
            )
            plans.append(NodePlan(stage, node, launch, stage.threads, allowed, log_level))
    return FarmPlan(topology, tuple(plans), out, control)


def _host_averaging_stores(plan: FarmPlan) -> list[Any]:
    """Host the rendezvous store of each stage whose learners average at an address the
    launcher chose, so that no node's death takes its stage's store with it."""
    addresses = sorted(
        {
            n.launch.rendezvous
            for n in plan.nodes
            if n.launch.rendezvous
            and (n.stage.learner or {}).get("average_store", "external") == "external"
        }
    )
    if not addresses:
        return []
    from models.averaging import AveragingStore  # torch loads only when a stage averages

    stores = []
    for address in addresses:
        try:
            stores.append(AveragingStore(address))
        except OSError as exc:
            for store in stores:
                store.close()
            msg = f"cannot host the flows' averaging store at {address}: {exc}"
            raise FarmError(msg) from exc
    return stores


def _check_averaging_timeout(stage: StageSpec, stall_after_s: float) -> None:
    """A failed averaging round holds a learning node's event loop for up to about
    ``average_timeout_s``: the launcher must not expire the survivors for it."""
    learner = stage.learner or {}
    timeout_s = learner.get("average_timeout_s")
    if learner.get("average_every_steps") and timeout_s and timeout_s > stall_after_s:
        raise TopologyError(
            key=f"topology.{stage.name}.learner.average_timeout_s",
            problem=f"must be at most farm.stall_after_s ({stall_after_s:g} s), or a "
            "failed averaging round could get live nodes expired",
        )


def _rendezvous(stage: StageSpec, *, fixed: bool) -> str:
    """Where the stage's flow learners meet to average, if they average and the topology
    does not say: node 0's host at a port free for this run (two farms on one host never
    share one). Nodes started one per host (``fixed``) need it in the topology."""
    learner = stage.learner or {}
    if not learner.get("average_every_steps") or "average_address" in learner:
        return ""
    if fixed:
        raise TopologyError(
            key=f"topology.{stage.name}.learner.average_address",
            problem="must be set when nodes are started one per host (trigfarm node)",
        )
    return f"tcp://{stage.host(0)}:{free_tcp_port()}"


def _keys(topology: Topology, stage: StageSpec, upstream: StageSpec | None) -> CurveKeys | None:
    if not topology.security.curve:
        return None
    try:
        return security.node_keys(
            topology.keys_dir(), stage.name, upstream.name if upstream else None
        )
    except (FileNotFoundError, ValueError) as exc:
        raise TopologyError(key="topology.security.keys_dir", problem=str(exc)) from exc


# -- one node -------------------------------------------------------------------------------


def _limit_threads(threads: int) -> None:
    for key in THREAD_ENV:
        os.environ[key] = str(threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up banner


def _watch_parent(node: Node, parent_pid: int) -> None:
    """Drain the node if the launcher dies (its children are re-parented)."""

    def watch() -> None:
        while node.state != "stopped":
            if os.getppid() != parent_pid:
                log.warning("%s: launcher is gone, draining", node.config.name)
                node.request_stop()
                return
            time.sleep(1.0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_node(
    plan: NodePlan, *, parent_pid: int | None = None, early_stop: EarlyStop | None = None
) -> int:
    """Build and run one node until it stops; returns an exit code (0 on a clean stop).

    The worker is built here, in the node's own process, so heavy imports (TensorFlow,
    torch) never happen in the launcher. ``early_stop`` holds a stop asked for while they
    ran; the node then starts, drains nothing and stops cleanly.
    """
    _limit_threads(plan.threads)
    name = plan.node.name
    role = ROLES[plan.stage.role]
    try:
        worker = role.build(plan.stage, plan.launch)
    except (TopologyError, ValueError, FileNotFoundError, ImportError) as exc:
        log.error("%s: cannot build the %s worker: %s", name, plan.stage.role, exc)
        return 2
    if "torch" in sys.modules:  # the worker may have set its own; the topology decides
        sys.modules["torch"].set_num_threads(plan.threads)
    ctx = zmq.Context()
    auth = None
    guard = security.KeyGuard(name, plan.allowed_clients)
    if plan.node.socket.curve is not None and (plan.node.outputs or plan.node.receipts_to):
        auth = security.start_authenticator(ctx, guard)

    def extra() -> dict[str, Any]:
        return {"curve_refused": guard.refused}

    node = Node(plan.node, worker, context=ctx, extra_report=extra)
    if early_stop is not None:
        early_stop.pass_to(node)
    if parent_pid is not None:
        _watch_parent(node, parent_pid)
    try:
        node.run()
    finally:
        if auth is not None:
            auth.stop()
        ctx.term()
    return 0 if node.stats.balanced else 3


def exit_node_process(code: int) -> None:
    """End a node process now, with ``code``, once its logs and stdio are flushed.

    The node's books and flows are written by then. Skipping interpreter finalization is
    deliberate: Python 3.11 ends a daemon thread that wakes during finalization with
    ``pthread_exit``, and one that wakes inside torch's C++ (an averaging call abandoned
    on a store that has just closed) then aborts the process ("terminate called without
    an active exception"), turning a clean stop into SIGABRT.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken pipe: nothing left to say on it
    os._exit(code)


class EarlyStop:
    """SIGTERM or SIGINT while a node process is still importing and building its worker
    (seconds: TensorFlow, torch): remembered and passed to the node once it exists, so a
    node stopped while it starts (a restart at the farm's staged stop) exits 0, not -15."""

    def __init__(self) -> None:
        self._asked = False
        self._node: Node | None = None
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        del signum, frame
        self._asked = True
        if self._node is not None:
            self._node.request_stop()

    def pass_to(self, node: Node) -> None:
        self._node = node
        if self._asked:
            node.request_stop()


def spawn_node(ctx: SpawnContext, plan: NodePlan) -> BaseProcess:
    """Start one node process. It begins life with SIGTERM and SIGINT blocked (the mask is
    inherited), so a stop sent while the new interpreter imports this module waits for
    :class:`EarlyStop` instead of killing the node with -15."""
    process = ctx.Process(
        target=_child_main, args=(plan, os.getpid()), name=plan.node.name, daemon=False
    )
    resource_tracker.ensure_running()  # its first start unblocks SIGTERM and SIGINT
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return process


def _child_main(plan: NodePlan, parent_pid: int) -> None:
    """Entry point of a spawned node process."""
    os.setsid()  # Ctrl-C in the terminal reaches the launcher only; it stops us in order
    early_stop = EarlyStop()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # a stop held since spawn lands
    logging.basicConfig(
        level=plan.log_level,
        format=f"%(asctime)s {plan.node.name} %(name)s %(levelname)s %(message)s",
    )
    exit_node_process(run_node(plan, parent_pid=parent_pid, early_stop=early_stop))


# -- the farm -------------------------------------------------------------------------------


@dataclass(slots=True)
class NodeStatus:
    """What the launcher knows about one node process."""

    plan: NodePlan
    process: BaseProcess
    heartbeat: Heartbeat | None = None
    signalled: bool = False
    exitcode: int | None = None
    last_heartbeat_s: float | None = None  # monotonic time of the last heartbeat
    lost: str = ""  # why this process was lost ("" while it is not)
    lost_at_s: float | None = None  # monotonic time this process was found lost
    death_handled: bool = False  # the launcher has acted on this process's death
    restarted: list[dict[str, Any]] = field(default_factory=list)  # earlier, lost processes

    def loss(self, t0: float, *, restarted: bool) -> dict[str, Any]:
        """This process's loss as plain data (``at_s`` after ``t0``)."""
        return {
            "reason": self.lost,
            "at_s": None if self.lost_at_s is None else self.lost_at_s - t0,
            "restarted": restarted,
            "stats": self.heartbeat.stats if self.heartbeat else {},
        }

    def losses(self, t0: float) -> list[dict[str, Any]]:
        current = [self.loss(t0, restarted=False)] if self.lost else []
        return [*self.restarted, *current]


@dataclass(slots=True)
class FarmResult:
    """How a run ended: final stats per node (from their stats files) and timings."""

    stats: dict[str, dict[str, Any]]
    exitcodes: dict[str, int | None]
    wall_s: float
    interrupted: bool
    started_s: float
    heartbeats: dict[str, dict[str, Any]] = field(default_factory=dict)
    # name -> every loss of that node: reason, at_s (after the start), whether it was
    # restarted, and the stats of its last heartbeat (a lost process writes no stats file)
    losses: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


class Farm:
    """Runs a planned farm to completion (``run()`` blocks).

    ``on_update(statuses)`` is called about ten times a second with the latest heartbeats
    (the live view). ``duration_s`` > 0 stops the source after that many seconds.
    ``restarts`` bounds the restarts of each node whose stage would otherwise be empty (of
    every lost node with ``restart_every_node``: a restarted HLT node rejoins its stage's
    averaging group); ``stop_deadline_s`` > 0 kills every node that long after a stop signal.
    """

    def __init__(
        self,
        plan: FarmPlan,
        *,
        duration_s: float = 0.0,
        start_timeout_s: float = 180.0,
        on_update: Callable[[dict[str, NodeStatus]], None] | None = None,
        restarts: int = 2,
        stop_deadline_s: float = 0.0,
        restart_every_node: bool = False,
    ) -> None:
        if restarts < 0 or stop_deadline_s < 0:
            msg = f"restarts and stop_deadline_s must be >= 0, got {restarts}, {stop_deadline_s}"
            raise ValueError(msg)
        self.plan = plan
        self.duration_s = duration_s
        self.start_timeout_s = start_timeout_s
        self.on_update = on_update
        self.restarts = restarts
        self.restart_every_node = restart_every_node
        self.stop_deadline_s = stop_deadline_s
        self.statuses: dict[str, NodeStatus] = {}
        self._interrupts = 0
        self._stop_signal_s: float | None = None
        self._source_started = False
        self._stopping = False
        self._failure_logged = False
        self._t0 = time.monotonic()
        self._ctx = mp.get_context("spawn")

    # -- public ------------------------------------------------------------------------------

    def run(self) -> FarmResult:
        out = Path(self.plan.out_dir)
        (out / "nodes").mkdir(parents=True, exist_ok=True)
        in_main = threading.current_thread() is threading.main_thread()
        # SIGINT (Ctrl-C) and SIGTERM (timeout, CI, systemd, kubectl) both stop in stages.
        previous = (
            {sig: signal.signal(sig, self._on_stop_signal) for sig in _STOP_SIGNALS}
            if in_main
            else {}
        )
        t0 = self._t0 = time.monotonic()
        zctx = zmq.Context()
        stores: list[Any] = []
        try:
            stores += _host_averaging_stores(self.plan)
            with zctx.socket(zmq.SUB) as control:
                control.setsockopt(zmq.SUBSCRIBE, HEARTBEAT_TOPIC)
                control.bind(self.plan.control)
                self._write_farm_file("starting")
                self._run_stages(control)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._kill_all()
            for store in stores:
                store.close()
            zctx.term()
            self._write_farm_file("stopped")
        wall = time.monotonic() - t0
        stats = {}
        for name, status in self.statuses.items():
            path = Path(status.plan.node.stats_path or "")
            if path.is_file():
                stats[name] = json.loads(path.read_text())
        return FarmResult(
            stats=stats,
            exitcodes={n: s.process.exitcode for n, s in self.statuses.items()},
            wall_s=wall,
            interrupted=self._interrupts > 0,
            started_s=t0,
            heartbeats={
                n: asdict(s.heartbeat) for n, s in self.statuses.items() if s.heartbeat is not None
            },
            losses={n: losses for n, s in self.statuses.items() if (losses := s.losses(t0))},
        )

    # -- stages ------------------------------------------------------------------------------

    def _run_stages(self, control: zmq.Socket) -> None:
        stages = [s.name for s in self.plan.topology.stages]
        first, rest = stages[0], stages[1:]
        for stage in reversed(rest):
            self._start(stage)
        if rest and not self._wait(control, lambda: self._all_running(rest), self.start_timeout_s):
            if self._interrupts:
                return
            failed = [n for n, s in self.statuses.items() if s.process.exitcode not in (None, 0)]
            if failed:
                msg = f"node(s) {failed} failed to start (their errors are logged above)"
            else:
                msg = f"nodes did not report running within {self.start_timeout_s:.0f} s"
            raise FarmError(msg)
        self._start(first)
        self._source_started = True
        source_started = time.monotonic()
        self._wait(control, lambda: self._stage_done(first) or self._duration_over(source_started))
        for stage in stages:
            self._signal_stage(stage)
            self._wait(control, lambda stage=stage: self._stage_done(stage))  # type: ignore[misc]
            if self._interrupts > 1:
                return

    def _start(self, stage: str) -> None:
        for plan in self.plan.stage_nodes(stage):
            self.statuses[plan.node.name] = NodeStatus(plan, self._spawn(plan))
        self._write_farm_file("starting")

    def _spawn(self, plan: NodePlan) -> BaseProcess:
        process = spawn_node(self._ctx, plan)
        log.info("started %s (pid %s)", plan.node.name, process.pid)
        return process

    def _wait(
        self, control: zmq.Socket, done: Callable[[], bool], timeout_s: float | None = None
    ) -> bool:
        """Pump heartbeats until ``done()``; False on a timeout, a second signal, or (before
        the source starts) a failed node. Once running, a failed or silent node starts the
        staged stop instead, so the survivors drain and deliver what they hold."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not done():
            if self._interrupts > 1:
                return False
            if self._interrupts and not self._source_started:
                return False
            if deadline is not None and time.monotonic() > deadline:
                return False
            if self._past_stop_deadline():
                return False
            self._expire_silent_nodes()
            if not self._source_started:
                if self._any_failed():
                    return False
            else:
                self._handle_dead_nodes()
            self._pump(control, 100)
        self._pump(control, 0)
        return True

    def _past_stop_deadline(self) -> bool:
        """``stop_deadline_s`` after the first stop signal, kill every node."""
        if self._stop_signal_s is None or self.stop_deadline_s <= 0:
            return False
        if time.monotonic() - self._stop_signal_s < self.stop_deadline_s:
            return False
        log.error(
            "nodes still running %.0f s after the stop signal; killing them", self.stop_deadline_s
        )
        self._kill_now()
        self._interrupts = max(self._interrupts, 2)
        return True

    def _expire_silent_nodes(self) -> None:
        """Kill a node whose heartbeats stopped ``stall_after_s`` ago (stopped, e.g.
        SIGSTOP, or hung), or whose event loop has been held in one call for three times
        that (its heartbeats then come from its keepalive thread): no wait of the
        launcher is unbounded."""
        limit_s = self.plan.topology.farm.stall_after_s
        now = time.monotonic()
        for name, status in self.statuses.items():
            last = status.last_heartbeat_s
            if status.lost or last is None or not status.process.is_alive():
                continue
            loop_age_s = status.heartbeat.stats.get("loop_age_s", 0.0) if status.heartbeat else 0
            if status.heartbeat is not None and status.heartbeat.state == "stopped":
                if now - last > limit_s:  # its books are written; only its linger is left
                    log.warning(
                        "%s stopped but has not exited in %.0f s; killing it", name, limit_s
                    )
                    status.death_handled = True
                    status.process.kill()
                continue
            if now - last > limit_s:
                status.lost = f"no heartbeat for {now - last:.0f} s; killed"
            elif loop_age_s > 3 * limit_s:
                status.lost = f"event loop held for {loop_age_s:.0f} s; killed"
            if status.lost:
                status.lost_at_s = now
                log.error("node %s lost: %s", name, status.lost)
                status.process.kill()

    def _pump(self, control: zmq.Socket, timeout_ms: int) -> None:
        if control.poll(timeout_ms):
            while True:
                try:
                    frames = control.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    beat = Heartbeat.from_frames(frames)
                except FrameError:
                    continue
                status = self.statuses.get(beat.name)
                if status is not None:
                    status.last_heartbeat_s = time.monotonic()
                    new_port = (
                        status.heartbeat is None
                        or status.heartbeat.metrics_port != beat.metrics_port
                    )
                    status.heartbeat = beat
                    if new_port:
                        self._write_farm_file("running")
        for status in self.statuses.values():
            status.exitcode = status.process.exitcode
        if self.on_update is not None:
            self.on_update(self.statuses)

    def _all_running(self, stages: list[str]) -> bool:
        for stage in stages:
            for plan in self.plan.stage_nodes(stage):
                status = self.statuses[plan.node.name]
                if status.heartbeat is None or status.heartbeat.state != "running":
                    return False
        return True

    def _live_nodes(self, stage: str) -> list[str]:
        """The nodes of ``stage`` whose process is alive."""
        return [
            p.node.name
            for p in self.plan.stage_nodes(stage)
            if self.statuses[p.node.name].process.is_alive()
        ]

    def _stage_done(self, stage: str) -> bool:
        return not self._live_nodes(stage)

    def _duration_over(self, started: float) -> bool:
        return self.duration_s > 0 and time.monotonic() - started >= self.duration_s

    def _any_failed(self) -> bool:
        """Before the source starts, any failed node stops the farm."""
        failed = [n for n, s in self.statuses.items() if s.process.exitcode not in (None, 0, 3)]
        if failed and not self._failure_logged:
            self._failure_logged = True
            log.error("node(s) %s exited with an error; stopping the farm", failed)
            for status in self.statuses.values():
                self._terminate(status)
        return bool(failed)

    def _handle_dead_nodes(self) -> None:
        """Once running, a dead node is taken out: its stage goes on with the survivors (and
        the node is restarted, with ``restart_every_node``); a stage with none left is
        restarted while restarts last, else the run stops in stages (the survivors drain,
        so their last flow snapshots reach the archive)."""
        now = time.monotonic()
        for name, status in self.statuses.items():
            code = status.process.exitcode
            if code in (None, 0, 3) or status.death_handled:
                continue
            status.death_handled = True
            if not status.lost:
                status.lost = f"exited with code {code}"
            if status.lost_at_s is None:
                status.lost_at_s = now
            stage = status.plan.stage.name
            alive = self._live_nodes(stage)
            log.error("node %s lost (%s) at %.1f s", name, status.lost, now - self._t0)
            if alive:
                log.error("stage %s degraded: %s go on", stage, ", ".join(alive))
                if self.restart_every_node and self._can_restart(status):
                    self._restart(status)
            elif self._can_restart(status):
                self._restart(status)
            elif not self._stopping:
                log.error("stage %s has no live node; stopping the farm in stages", stage)
                self._stop_in_stages()

    def _can_restart(self, status: NodeStatus) -> bool:
        first = self.plan.topology.stages[0].name
        return (
            len(status.restarted) < self.restarts
            and status.plan.stage.name != first
            and not status.signalled
        )

    def _restart(self, status: NodeStatus) -> None:
        """A new process for a lost node; the loss (with the lost process's last
        heartbeat stats, for the books) is kept for the report."""
        status.restarted.append(status.loss(self._t0, restarted=True))
        log.warning(
            "restarting %s (restart %d of %d)",
            status.plan.node.name,
            len(status.restarted),
            self.restarts,
        )
        # It waits for as many downstream peers as are alive now, not for those lost.
        downstream = self.plan.topology.downstream(status.plan.stage.name)
        if status.plan.node.output_peers and downstream is not None:
            alive = len(self._live_nodes(downstream.name))
            node = replace(status.plan.node, output_peers=max(alive, 1))
            status.plan = replace(status.plan, node=node)
        status.process = self._spawn(status.plan)
        status.heartbeat = None
        status.last_heartbeat_s = None
        status.exitcode = None
        status.lost = ""
        status.lost_at_s = None
        status.death_handled = False
        self._write_farm_file("running")

    def _signal_stage(self, stage: str) -> None:
        for plan in self.plan.stage_nodes(stage):
            status = self.statuses.get(plan.node.name)
            if status is not None:
                self._terminate(status)

    def _stop_in_stages(self) -> None:
        """Stop the source; ``_run_stages`` then drains every later stage in chain order."""
        self._stopping = True
        self._signal_stage(self.plan.topology.stages[0].name)

    def _terminate(self, status: NodeStatus) -> None:
        if not status.signalled and status.process.is_alive():
            status.process.terminate()  # SIGTERM: the node drains and stops
        status.signalled = True

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        del frame
        name = signal.Signals(signum).name
        self._interrupts += 1
        if self._interrupts == 1:
            self._stop_signal_s = time.monotonic()
            log.warning("%s: stopping the farm in stages (a second signal kills)", name)
            self._stop_in_stages()
        else:
            log.warning("%s again: killing every node", name)
            self._kill_now()

    def _kill_now(self) -> None:
        for status in self.statuses.values():
            if status.process.is_alive():
                status.process.kill()

    def _kill_all(self) -> None:
        for status in self.statuses.values():
            self._terminate(status)
        for status in self.statuses.values():
            status.process.join(30)
            if status.process.is_alive():
                log.error("%s did not stop; killing it", status.plan.node.name)
                status.process.kill()
                status.process.join(5)

    def _write_farm_file(self, state: str) -> None:
        """``<out>/farm.json`` (nodes, pids, metrics addresses) and ``<out>/targets.json``
        (Prometheus file-based service discovery), for ``trigfarm monitor``."""
        nodes = []
        for name, status in self.statuses.items():
            port = status.heartbeat.metrics_port if status.heartbeat else None
            host = status.plan.node.metrics_host
            nodes.append(
                {
                    "name": name,
                    "stage": status.plan.stage.name,
                    "role": status.plan.stage.role,
                    "pid": status.process.pid,
                    "metrics": f"{host}:{port}" if port else None,
                }
            )
        body = {
            "farm": self.plan.topology.farm.name,
            "topology": self.plan.topology.path,
            "state": state,
            "control": self.plan.control,
            "out_dir": self.plan.out_dir,
            "nodes": nodes,
        }
        out = Path(self.plan.out_dir)
        targets = [
            {"targets": [n["metrics"]], "labels": {"node": n["name"], "stage": n["stage"]}}
            for n in nodes
            if n["metrics"]
        ]
        for name, content in (("farm.json", body), ("targets.json", targets)):
            write_durably(out / name, json.dumps(content, indent=2).encode())
