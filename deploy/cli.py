"""The ``trigfarm`` command line."""

from __future__ import annotations

import logging
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import click

from deploy.analyze_cli import analyze
from deploy.firmware_cli import firmware
from deploy.simulate_cli import simulate
from stream import NodeConfig
from stream.testing import FakeNodeSpec, free_tcp_port, run_fake_node, stats_of


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """trigfarm: a simulated LHC trigger farm that learns online."""
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


@main.command()
@click.option(
    "--events",
    type=click.IntRange(min=1),
    default=200_000,
    envvar="TRIGFARM_EVENTS",
    help="Events to send (env TRIGFARM_EVENTS).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=1024, help="Events per batch.")
def run(events: int, batch_size: int) -> None:
    """Run a two-node source -> sink demo over TCP and report its rate."""
    n_batches = -(-events // batch_size)
    port = free_tcp_port()
    with tempfile.TemporaryDirectory(prefix="trigfarm-run-") as tmp:
        sink_stats = Path(tmp) / "sink.json"
        source = FakeNodeSpec(
            NodeConfig("source", "source", outputs={"out": f"@tcp://127.0.0.1:{port}"}),
            "source",
            (("n_batches", n_batches), ("batch_size", batch_size)),
        )
        sink = FakeNodeSpec(
            NodeConfig(
                "sink",
                "sink",
                inputs=(f">tcp://127.0.0.1:{port}",),
                drain_idle_s=0.5,
                stats_path=str(sink_stats),
            ),
            "sink",
        )
        spawn = mp.get_context("spawn")
        procs = [spawn.Process(target=run_fake_node, args=(spec,)) for spec in (sink, source)]
        t0 = time.perf_counter()
        for proc in procs:
            proc.start()
        procs[1].join()
        procs[0].terminate()  # SIGTERM: the sink drains what is in flight, then stops
        procs[0].join()
        stats = stats_of(sink_stats)
    elapsed = time.perf_counter() - t0
    received = stats["events_in"]
    click.echo(
        f"source -> sink: {received} of {n_batches * batch_size} events in {elapsed:.2f} s "
        f"({received / elapsed:,.0f} events/s, including process start-up)"
    )
    click.echo(
        f"sink batch latency p50 {stats['latency'].get('p50_s', 0) * 1e3:.3f} ms; "
        f"books balance: {stats['balanced']}"
    )


main.add_command(simulate)
main.add_command(firmware)
main.add_command(analyze)
