"""The farm launcher: a topology becomes one process per node, wired over ZeroMQ TCP.

``plan_farm`` turns a topology into ``NodePlan``s (names, endpoints, keys, run settings);
``run_node`` runs one plan in the current process (``trigfarm node`` and every child of
the launcher); ``Farm`` starts the children with ``spawn``, follows their heartbeats on
a control socket, and stops them in stages.

Start order: every consumer first, the source last once all consumers report
``running`` (so that start-up time is not counted as back-pressure). Staged stop: the
source finishes (its event budget, ``--duration``, or Ctrl-C), then each stage in chain
order is told to drain (SIGTERM) only once the stage before it has exited, so every
batch in flight is processed and the archive flushes last. A second Ctrl-C kills.
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
from dataclasses import asdict, dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import zmq

from deploy import security
from deploy.roles import ROLES, LaunchContext
from deploy.topology import StageSpec, Topology, TopologyError
from stream.errors import FrameError
from stream.node import Node, NodeConfig
from stream.protocol import HEARTBEAT_TOPIC, Heartbeat
from stream.testing import free_tcp_port
from stream.transport import CurveKeys, SocketOptions

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
        if role.output_port is None:
            continue
        if stage.port == 0 and fixed:
            raise TopologyError(
                key=f"topology.{stage.name}.port",
                problem="needs a fixed port to run nodes on separate hosts",
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
        upstream = topology.upstream(stage.name)
        downstream = topology.downstream(stage.name)
        keys = _keys(topology, stage, upstream)
        allowed: tuple[bytes, ...] = ()
        if topology.security.curve and downstream is not None:
            allowed = (security.load_public(topology.keys_dir(), downstream.name),)
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
                ),
                stats_path=f"{out}/nodes/{name}.json",
                output_peers=downstream.count if outputs and downstream else 0,
                peer_wait_s=farm.peer_wait_s,
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


def run_node(plan: NodePlan, *, parent_pid: int | None = None) -> int:
    """Build and run one node until it stops; returns an exit code (0 on a clean stop).

    The worker is built here, in the node's own process, so heavy imports (TensorFlow,
    torch) never happen in the launcher.
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
    if plan.node.socket.curve is not None and plan.node.outputs:
        auth = security.start_authenticator(ctx, guard)

    def extra() -> dict[str, Any]:
        return {"curve_refused": guard.refused}

    node = Node(plan.node, worker, context=ctx, extra_report=extra)
    if parent_pid is not None:
        _watch_parent(node, parent_pid)
    try:
        node.run()
    finally:
        if auth is not None:
            auth.stop()
        ctx.term()
    return 0 if node.stats.balanced else 3


def _child_main(plan: NodePlan, parent_pid: int) -> None:
    """Entry point of a spawned node process."""
    os.setsid()  # Ctrl-C in the terminal reaches the launcher only; it stops us in order
    logging.basicConfig(
        level=plan.log_level,
        format=f"%(asctime)s {plan.node.name} %(name)s %(levelname)s %(message)s",
    )
    raise SystemExit(run_node(plan, parent_pid=parent_pid))


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
    lost: str = ""  # why the launcher gave up on the node ("" while it is not lost)


@dataclass(slots=True)
class FarmResult:
    """How a run ended: final stats per node (from their stats files) and timings."""

    stats: dict[str, dict[str, Any]]
    exitcodes: dict[str, int | None]
    wall_s: float
    interrupted: bool
    started_s: float
    heartbeats: dict[str, dict[str, Any]] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)


class Farm:
    """Runs a planned farm to completion (``run()`` blocks).

    ``on_update(statuses)`` is called about ten times a second with the latest heartbeats
    (the live view). ``duration_s`` > 0 stops the source after that many seconds.
    """

    def __init__(
        self,
        plan: FarmPlan,
        *,
        duration_s: float = 0.0,
        start_timeout_s: float = 180.0,
        on_update: Callable[[dict[str, NodeStatus]], None] | None = None,
    ) -> None:
        self.plan = plan
        self.duration_s = duration_s
        self.start_timeout_s = start_timeout_s
        self.on_update = on_update
        self.statuses: dict[str, NodeStatus] = {}
        self._interrupts = 0
        self._source_started = False
        self._failure_logged = False
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
        t0 = time.monotonic()
        zctx = zmq.Context()
        try:
            with zctx.socket(zmq.SUB) as control:
                control.setsockopt(zmq.SUBSCRIBE, HEARTBEAT_TOPIC)
                control.bind(self.plan.control)
                self._write_farm_file("starting")
                self._run_stages(control)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._kill_all()
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
            lost={n: s.lost for n, s in self.statuses.items() if s.lost},
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
            process = self._ctx.Process(
                target=_child_main, args=(plan, os.getpid()), name=plan.node.name, daemon=False
            )
            process.start()
            self.statuses[plan.node.name] = NodeStatus(plan, process)
            log.info("started %s (pid %s)", plan.node.name, process.pid)
        self._write_farm_file("starting")

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
            self._expire_silent_nodes()
            if self._any_failed() and not self._source_started:
                return False
            self._pump(control, 100)
        self._pump(control, 0)
        return True

    def _expire_silent_nodes(self) -> None:
        """Kill a node whose heartbeats stopped ``stall_after_s`` ago (stalled, e.g.
        SIGSTOP): no wait of the launcher is unbounded."""
        limit_s = self.plan.topology.farm.stall_after_s
        now = time.monotonic()
        for name, status in self.statuses.items():
            last = status.last_heartbeat_s
            if status.lost or last is None or not status.process.is_alive():
                continue
            if now - last > limit_s:
                status.lost = f"no heartbeat for {now - last:.0f} s; killed"
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

    def _stage_done(self, stage: str) -> bool:
        return all(
            not self.statuses[p.node.name].process.is_alive() for p in self.plan.stage_nodes(stage)
        )

    def _duration_over(self, started: float) -> bool:
        return self.duration_s > 0 and time.monotonic() - started >= self.duration_s

    def _any_failed(self) -> bool:
        failed = [n for n, s in self.statuses.items() if s.process.exitcode not in (None, 0, 3)]
        if failed and not self._failure_logged:
            self._failure_logged = True
            if self._source_started:
                # Stop in stages, as on a signal: the survivors drain into the stages after
                # them, so their last flow snapshots still reach the archive.
                log.error("node(s) %s died; stopping the farm in stages", failed)
                self._stop_in_stages()
            else:
                log.error("node(s) %s exited with an error; stopping the farm", failed)
                for status in self.statuses.values():
                    self._terminate(status)
        return bool(failed)

    def _signal_stage(self, stage: str) -> None:
        for plan in self.plan.stage_nodes(stage):
            status = self.statuses.get(plan.node.name)
            if status is not None:
                self._terminate(status)

    def _stop_in_stages(self) -> None:
        """Stop the source; ``_run_stages`` then drains every later stage in chain order."""
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
            log.warning("%s: stopping the farm in stages (a second signal kills)", name)
            self._stop_in_stages()
        else:
            log.warning("%s again: killing every node", name)
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
            tmp = out / f".{name}.tmp"
            tmp.write_text(json.dumps(content, indent=2))
            tmp.replace(out / name)
