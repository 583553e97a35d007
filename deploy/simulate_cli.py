"""``trigfarm simulate``: generate a process into an HDF5 event cache."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import click

from simulator.cache import open_cache
from simulator.production import simulate_to_file
from simulator.recipes import PROCESSES, make_recipe, parse_parameter


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


@click.command(context_settings={"show_default": True})
@click.option(
    "--process",
    "process_name",
    type=click.Choice(sorted(PROCESSES)),
    envvar="TRIGFARM_PROCESS",
    help="Named process recipe (env TRIGFARM_PROCESS); --list describes them.",
)
@click.option(
    "--events",
    type=click.IntRange(min=1),
    default=1000,
    envvar="TRIGFARM_EVENTS",
    help="Events to generate (env TRIGFARM_EVENTS).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TRIGFARM_OUT",
    help="Output HDF5 file (env TRIGFARM_OUT).",
)
@click.option(
    "--seed",
    type=click.IntRange(0, 900_000_000),
    default=None,
    envvar="TRIGFARM_SEED",
    help="Base random seed; default: the recipe's (env TRIGFARM_SEED).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=_default_workers(),
    envvar="TRIGFARM_WORKERS",
    help="Worker processes, one per core (env TRIGFARM_WORKERS).",
)
@click.option(
    "--block-size",
    type=click.IntRange(min=1),
    default=256,
    envvar="TRIGFARM_BLOCK_SIZE",
    help="Events per reproducible block (env TRIGFARM_BLOCK_SIZE).",
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="Change a recipe parameter, e.g. --set m_x_gev=300 --set pileup_mean=20.",
)
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--list", "list_processes", is_flag=True, help="List the processes and exit.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def simulate(
    process_name: str | None,
    events: int,
    out: Path | None,
    seed: int | None,
    workers: int,
    block_size: int,
    settings: tuple[str, ...],
    force: bool,
    list_processes: bool,
    quiet: bool,
) -> None:
    """Generate Pythia 8 + FastJet events of one process into a chunked HDF5 cache.

    The file records the recipe, seed, block size, detector and package versions; the
    same seed and block size give the same events for any number of workers. Ctrl-C
    leaves a valid file marked partial.
    """
    if list_processes:
        for name, recipe in PROCESSES.items():
            click.echo(f"{name:10s} id={recipe.process_id:<3d} {recipe.description}")
        return
    if process_name is None or out is None:
        raise click.UsageError("--process and --out are required (or use --list)")
    recipe = PROCESSES[process_name]
    try:
        changes = dict(parse_parameter(recipe, text) for text in settings)
        recipe = make_recipe(process_name, **changes)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--set") from exc
    if out.exists() and not force:
        msg = f"{out} exists; use --force to replace it"
        raise click.UsageError(msg)
    result = simulate_to_file(
        recipe,
        events,
        out,
        seed=seed,
        workers=workers,
        block_size=block_size,
        overwrite=force,
        progress=not quiet,
        command=shlex.join(["trigfarm", *sys.argv[1:]]),
    )
    if result.info is None:
        click.echo(f"interrupted before the first block; {out} was not written", err=True)
        sys.exit(130)
    info = open_cache(result.info.path)
    stats = result.stats
    state = "complete" if info.complete else "PARTIAL (interrupted)"
    click.echo(
        f"{info.path}: {info.n_events} {recipe.name} events, {state}; "
        f"{result.elapsed_s:.1f} s, {result.events_per_s:.1f} events/s with "
        f"{info.attrs['workers']} worker(s); Pythia aborted {stats.aborted} of "
        f"{stats.tried} tried, filter kept {stats.kept}"
    )
    if result.interrupted:
        sys.exit(130)
