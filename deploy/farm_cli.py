"""The farm commands: ``trigfarm run``, ``replay``, ``node``, ``keys``, ``monitor``, ``deploy``."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from deploy.topology import DEFAULT, SHIPPED, Topology, TopologyError, load_topology

log = logging.getLogger(__name__)

TOPOLOGY_HELP = (
    "Topology TOML file, or a shipped name "
    f"({', '.join(SHIPPED)}); default: the built-in default (env TRIGFARM_TOPOLOGY)."
)


def _topology(path: str | None, *, deep: bool = False) -> Topology:
    from deploy.roles import ROLES

    try:
        return load_topology(path, roles=ROLES, deep=deep)
    except TopologyError as exc:
        raise click.UsageError(str(exc)) from exc


def _log_level() -> int:
    return logging.getLogger().getEffectiveLevel()


def _one_line(exc: object) -> str:
    return " ".join(str(exc).split())


def _bad_files_at_run_time(report: dict[str, Any]) -> dict[str, list[str]]:
    """Files each source node could not read during the run (its report's bad_file_paths)."""
    bad: dict[str, list[str]] = {}
    for stage in report.get("stages", []):
        for node in stage.get("nodes", []):
            paths = node.get("worker", {}).get("bad_file_paths") or []
            if paths:
                bad[str(node.get("name", stage.get("name")))] = list(paths)
    return bad


def _readable_files(
    layout: str, patterns: list[str], *, skip_bad_files: bool, what: str
) -> list[str]:
    """Expand ``patterns`` and check every file opens as ``layout``; before the farm starts.

    A bad file stops the command with a one-line error naming it, or with
    ``skip_bad_files`` is left out with one line each on stderr. Fails if none is left.
    """
    from simulator.replay import check_file, expand_paths, reader_for
    from stream.errors import DataFileError

    try:
        reader_for(layout)
        paths = expand_paths(patterns)
    except (KeyError, FileNotFoundError) as exc:
        raise click.UsageError(_one_line(exc.args[0] if exc.args else exc)) from exc
    good: list[str] = []
    for path in paths:
        try:
            check_file(layout, path)
        except DataFileError as exc:
            if not skip_bad_files:
                msg = f"cannot replay {_one_line(exc)} (--skip-bad-files leaves such files out)"
                raise click.ClickException(msg) from exc
            click.echo(f"skipping bad {what} file {_one_line(exc)}", err=True)
            continue
        good.append(str(path))
    if skipped := len(paths) - len(good):
        click.echo(f"skipped {skipped} of {len(paths)} {what} file(s)", err=True)
    if not good:
        msg = f"no readable {what} file left of {len(paths)} ({', '.join(patterns)})"
        raise click.ClickException(msg)
    return good


@dataclasses.dataclass(frozen=True, slots=True)
class _Faults:
    """What the launcher does about lost nodes (``--restarts``, ``--stop-deadline``,
    ``--restart-every-node``)."""

    restarts: int
    stop_deadline_s: float
    restart_every_node: bool


def _run_and_print(
    topology: Topology,
    events: int,
    duration: float,
    out: Path | None,
    quiet: bool,
    faults: _Faults,
    *,
    skip_bad_files: bool = False,
) -> None:
    from deploy.launcher import FarmError
    from deploy.report import format_report
    from deploy.run import run_farm
    from deploy.view import ProgressView

    if events and duration:
        raise click.UsageError("give --events or --duration, not both")
    with ProgressView(f"trigfarm {topology.farm.name}") as view:
        try:
            outcome = run_farm(
                topology,
                out_dir=out,
                events=events,
                duration_s=duration,
                log_level=_log_level(),
                on_update=None if quiet else view.update,
                restarts=faults.restarts,
                stop_deadline_s=faults.stop_deadline_s,
                restart_every_node=faults.restart_every_node,
            )
        except (FarmError, TopologyError) as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(format_report(outcome.report))
    click.echo(f"report: {outcome.report_path}\ndashboard: {outcome.dashboard_path}")
    failed = {n: c for n, c in outcome.report["exitcodes"].items() if c != 0}
    if failed:
        click.echo(f"node(s) exited with errors: {failed}", err=True)
        sys.exit(1)
    bad = _bad_files_at_run_time(outcome.report)
    for name, paths in bad.items():
        click.echo(f"{name}: could not read {', '.join(paths)} (skipped; see its log)", err=True)
    if bad and not skip_bad_files:
        raise click.ClickException("bad input file(s) during the run; see above")
    if not outcome.report["accounting"]["balanced"]:
        sys.exit(3)


_topology_option = click.option(
    "--topology", "topology_path", envvar="TRIGFARM_TOPOLOGY", default=None, help=TOPOLOGY_HELP
)
_events_option = click.option(
    "--events",
    type=click.IntRange(min=0),
    default=0,
    envvar="TRIGFARM_EVENTS",
    help="Events the source makes; 0 keeps the topology's budget (env TRIGFARM_EVENTS).",
)
_duration_option = click.option(
    "--duration",
    type=click.FloatRange(min=0),
    default=0.0,
    envvar="TRIGFARM_DURATION",
    help="Stop the source after this many seconds; 0: no limit (env TRIGFARM_DURATION).",
)
_out_option = click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    envvar="TRIGFARM_OUT",
    help="Run folder (report, stats, archive); default runs/<farm>-<time> (env TRIGFARM_OUT).",
)
_quiet_option = click.option("--quiet", is_flag=True, help="No live progress view.")
_restarts_option = click.option(
    "--restarts",
    type=click.IntRange(min=0),
    default=2,
    help="Restarts of a node whose stage would otherwise have none left (the archive, say); "
    "a lost node of a stage with others is taken out instead (see --restart-every-node).",
)
_restart_every_node_option = click.option(
    "--restart-every-node",
    is_flag=True,
    help="Restart every lost node (within --restarts), not only a stage's last: a restarted "
    "HLT node rejoins its stage's averaging group and adopts the group's flow.",
)
_stop_deadline_option = click.option(
    "--stop-deadline",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Kill every node this many seconds after a stop signal (0: only a second signal).",
)


@click.command(context_settings={"show_default": True})
@_topology_option
@_events_option
@_duration_option
@_out_option
@_quiet_option
@_restarts_option
@_restart_every_node_option
@_stop_deadline_option
def run(
    topology_path: str | None,
    events: int,
    duration: float,
    out: Path | None,
    quiet: bool,
    restarts: int,
    restart_every_node: bool,
    stop_deadline: float,
) -> None:
    """Run the whole farm on this host, every node its own process, and report.

    Stops when the source is done (or on Ctrl-C or SIGTERM): each stage drains in turn,
    the archive flushes last, then the report (JSON + PNG) is written and summarised
    here. A node that dies or stops heartbeating is taken out (or restarted, if its
    stage has no other); the report counts what it took with it.
    """
    faults = _Faults(restarts, stop_deadline, restart_every_node)
    _run_and_print(_topology(topology_path), events, duration, out, quiet, faults)


@click.command(context_settings={"show_default": True})
@click.argument("dataset", nargs=-1, required=True)
@click.option(
    "--layout",
    default="lhco-features",
    help="Replay layout of the files (simulator.replay.READERS).",
)
@click.option("--signal", "signal_files", multiple=True, help="Signal files (layout as DATASET).")
@click.option("--signal-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.0)
@click.option("--loop/--no-loop", default=True, help="Start the files again when they end.")
@click.option(
    "--skip-bad-files",
    is_flag=True,
    help="Leave out files that cannot be read (one line each) instead of stopping.",
)
@click.option(
    "--topology", "topology_path", default="replay", envvar="TRIGFARM_TOPOLOGY", help=TOPOLOGY_HELP
)
@_events_option
@_duration_option
@_out_option
@_quiet_option
@_restarts_option
@_restart_every_node_option
@_stop_deadline_option
def replay(
    dataset: tuple[str, ...],
    layout: str,
    signal_files: tuple[str, ...],
    signal_fraction: float,
    loop: bool,
    skip_bad_files: bool,
    topology_path: str,
    events: int,
    duration: float,
    out: Path | None,
    quiet: bool,
    restarts: int,
    restart_every_node: bool,
    stop_deadline: float,
) -> None:
    """Run the farm with a source replaying DATASET files (paths or globs).

    A folder of LHCO R&D feature files splits into background (scalars_bkg*) and
    signal (scalars_sig*) by name; mix them with --signal-fraction.

    Every file is opened and its first event read before the farm starts: a file that
    cannot be read as --layout stops the command with an error naming it, unless
    --skip-bad-files leaves it out.
    """
    background = list(dataset)
    signal = list(signal_files)
    if len(dataset) == 1 and Path(dataset[0]).is_dir():
        folder = Path(dataset[0])
        background = (
            [str(folder / "*bkg*.h5")] if list(folder.glob("*bkg*.h5")) else [str(folder / "*.h5")]
        )
        if not signal and list(folder.glob("*sig*.h5")):
            signal = [str(folder / "*sig*.h5")]
    if signal_fraction > 0 and not signal:
        raise click.UsageError("--signal-fraction needs signal files")
    background = _readable_files(layout, background, skip_bad_files=skip_bad_files, what="dataset")
    if signal and signal_fraction > 0:
        signal = _readable_files(layout, signal, skip_bad_files=skip_bad_files, what="signal")
    source = {
        "background": [{"layout": layout, "paths": list(background)}],
        "signal": [{"layout": layout, "paths": list(signal)}]
        if signal and signal_fraction > 0
        else [],
        "signal_fraction": signal_fraction,
        "loop": loop,
    }
    topology = _topology(topology_path)
    first = topology.stages[0].name
    topology = topology.with_changes(**{first: {"config": source}})
    faults = _Faults(restarts, stop_deadline, restart_every_node)
    _run_and_print(topology, events, duration, out, quiet, faults, skip_bad_files=skip_bad_files)


@click.command(context_settings={"show_default": True})
@click.argument("stage")
@click.option("--config", "topology_path", required=True, help="The farm's topology TOML file.")
@click.option("--index", type=click.IntRange(min=0), default=0, help="Which node of the stage.")
@_events_option
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("node-out"),
    envvar="TRIGFARM_OUT",
    help="Folder for this node's stats and output (env TRIGFARM_OUT).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    envvar="TRIGFARM_METRICS_PORT",
    help="Serve metrics on this port instead of the topology's (env TRIGFARM_METRICS_PORT).",
)
@click.option(
    "--metrics-host",
    default=None,
    envvar="TRIGFARM_METRICS_HOST",
    help="Serve metrics on this interface instead of the topology's (env TRIGFARM_METRICS_HOST).",
)
def node(
    stage: str,
    topology_path: str,
    index: int,
    events: int,
    out: Path,
    metrics_port: int | None,
    metrics_host: str | None,
) -> None:
    """Run one node (STAGE, e.g. hlt) of a topology alone, for farms across hosts.

    Every link is the TCP endpoint the topology gives (fixed ports needed); with
    security.curve on, the stage's key pair comes from security.keys_dir. SIGTERM or
    Ctrl-C drains the node and writes <out>/nodes/<name>.json.

    Restart a node by running the same command again. Upstream nodes hold what they
    cannot deliver meanwhile (back-pressure pauses the stream; nothing is dropped). An
    archive restarted on the same --out continues its file sequence and keeps, as a
    partial file, every chunk a killed archive had flushed; a snapshot the killed one was
    writing is removed (it was never indexed). Events a killed archive had received but
    not yet written (its input queue) are lost, and the run's report counts them in
    flight. Flow snapshots are not: the archive sends a receipt for each one it stores,
    and an HLT node sends a snapshot again until it has one.
    """
    from deploy.launcher import EarlyStop, exit_node_process, plan_farm, run_node

    early_stop = EarlyStop()

    topology = _topology(topology_path)
    try:
        spec = topology.stage(stage)
    except KeyError as exc:
        raise click.UsageError(str(exc.args[0])) from exc
    if index >= spec.count:
        msg = f"stage {stage!r} has {spec.count} node(s); --index {index} is out of range"
        raise click.UsageError(msg)
    try:
        plan = plan_farm(
            topology,
            out_dir=out,
            events=events,
            control=topology.farm.control,
            fixed_ports=True,
            log_level=_log_level(),
        )
    except TopologyError as exc:
        raise click.UsageError(str(exc)) from exc
    mine = plan.stage_nodes(stage)[index]
    if metrics_port is not None or metrics_host is not None:
        node_config = dataclasses.replace(
            mine.node,
            metrics_port=mine.node.metrics_port if metrics_port is None else metrics_port,
            metrics_host=metrics_host or mine.node.metrics_host,
        )
        mine = dataclasses.replace(mine, node=node_config)
    (out / "nodes").mkdir(parents=True, exist_ok=True)
    click.echo(
        f"{mine.node.name}: inputs {list(mine.node.inputs)}, outputs {dict(mine.node.outputs)}",
        err=True,
    )
    exit_node_process(run_node(mine, early_stop=early_stop))


@click.command(context_settings={"show_default": True})
@_topology_option
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the key pairs; default: the topology's security.keys_dir.",
)
@click.option("--force", is_flag=True, help="Replace existing key pairs.")
def keys(topology_path: str | None, out: Path | None, force: bool) -> None:
    """Generate a CURVE key pair per stage of the topology (for security.curve = true)."""
    from deploy.security import generate_keys

    topology = _topology(topology_path)
    folder = out or topology.keys_dir()
    try:
        written = generate_keys(folder, [s.name for s in topology.stages], overwrite=force)
    except FileExistsError as exc:
        raise click.UsageError(str(exc)) from exc
    for path in written:
        click.echo(path)
    click.echo(
        f"keys in {folder}: copy to each host only the secret keys of the stages it runs; "
        "public keys go everywhere"
    )


@click.command(context_settings={"show_default": True})
@click.option(
    "--listen",
    default="tcp://0.0.0.0:29400",
    help="Address the store listens on (the HLT learners' average_address).",
)
def rendezvous(listen: str) -> None:
    """Host the rendezvous store of an averaging HLT stage until stopped (SIGTERM or
    Ctrl-C), so that no HLT node's death takes it with it (average_store = "external";
    `trigfarm deploy k8s` runs one per averaging stage). A restarted store starts empty:
    the nodes that used the old one then train alone."""
    import signal
    import threading

    from models.averaging import AveragingStore

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        store = AveragingStore(listen)
    except (OSError, ValueError) as exc:
        msg = f"cannot host the averaging store at {listen}: {exc}"
        raise click.ClickException(msg) from exc
    with store:
        click.echo(f"averaging store at {store.init_method}", err=True)
        stop.wait()


def _latest_run() -> Path | None:
    runs = sorted(Path("runs").glob("*/farm.json"), key=os.path.getmtime)
    return runs[-1].parent if runs else None


@click.command(context_settings={"show_default": True})
@click.option(
    "--run",
    "run_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run folder of the farm to watch (its farm.json); default: the newest under runs/.",
)
@click.option("--port", type=click.IntRange(1, 65535), default=9090, help="Prometheus web port.")
@click.option(
    "--duration",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Stop after S seconds (0: Ctrl-C).",
)
@click.option(
    "--grafana-out",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the Grafana dashboard JSON here.",
)
def monitor(run_dir: Path | None, port: int, duration: float, grafana_out: Path | None) -> None:
    """Start a local Prometheus scraping a running farm, and say where to look."""
    from deploy.monitoring import grafana_dashboard, prometheus_config_for_run
    from deploy.prometheus import PrometheusServer

    run_dir = run_dir or _latest_run()
    if run_dir is None or not (run_dir / "farm.json").is_file():
        raise click.UsageError(
            "no running farm found: start one with `trigfarm run`, or pass --run DIR"
        )
    config = prometheus_config_for_run(run_dir)
    if grafana_out is not None:
        grafana_out.write_text(json.dumps(grafana_dashboard(), indent=2))
        click.echo(f"grafana dashboard: {grafana_out} (import it; data source: this Prometheus)")
    try:
        server = PrometheusServer(config, port=port).start()
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"prometheus: {server.url} (graph: {server.url}/graph)")
    click.echo(
        "try: sum by (role) (rate(events_in_total[10s]))   or   sum(dropped_total) by (reason)"
    )
    try:
        deadline = time.monotonic() + duration if duration else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@click.group()
def deploy() -> None:
    """Generate deployment manifests from a topology."""


@deploy.command("k8s", context_settings={"show_default": True})
@_topology_option
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for the manifests.",
)
@click.option("--image", default="trigfarm:latest", help="Container image with trigfarm installed.")
@click.option("--namespace", default="trigfarm", help="Kubernetes namespace.")
def deploy_k8s(topology_path: str | None, out: Path, image: str, namespace: str) -> None:
    """Write Kubernetes manifests (one file per object) for the topology."""
    from deploy.k8s import manifests, write_manifests

    topology = _topology(topology_path or str(DEFAULT))
    try:
        objects = manifests(topology, image=image, namespace=namespace)
    except TopologyError as exc:
        raise click.UsageError(str(exc)) from exc
    for path in write_manifests(objects, out):
        click.echo(path)
