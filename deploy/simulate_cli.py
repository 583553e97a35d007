"""``trigfarm simulate``: generate a process into an HDF5 event cache, or a named dataset
(``--recipe lhco-like``) into chunked, resumable, checksummed files in the cache folder."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from deploy.topology import config_error
from simulator.dataset import DATASET_RECIPES, produce_dataset, verify_dataset
from simulator.generator import LAYOUTS
from simulator.production import simulate_to_file
from simulator.recipes import PROCESSES, make_recipe, parse_parameter
from stream.errors import DataFileError
from stream.eventfile import open_cache


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trigfarm" / "datasets"


@click.command(context_settings={"show_default": True})
@click.option(
    "--process",
    "process_name",
    type=click.Choice(sorted(PROCESSES)),
    envvar="TRIGFARM_PROCESS",
    help="Named process recipe (env TRIGFARM_PROCESS); --list describes them.",
)
@click.option(
    "--recipe",
    "recipe_name",
    type=click.Choice(sorted(DATASET_RECIPES)),
    envvar="TRIGFARM_RECIPE",
    help="Named dataset (env TRIGFARM_RECIPE): chunked, resumable, checksummed, in "
    "--cache-dir; rerun the same command to continue an interrupted one.",
)
@click.option(
    "--events",
    type=click.IntRange(min=1),
    default=1000,
    envvar="TRIGFARM_EVENTS",
    help="Events to generate; with --recipe, background events after the selection "
    "(env TRIGFARM_EVENTS).",
)
@click.option(
    "--signal-events",
    type=click.IntRange(min=1),
    default=None,
    envvar="TRIGFARM_SIGNAL_EVENTS",
    help="With --recipe: signal events; default a tenth of --events (env TRIGFARM_SIGNAL_EVENTS).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    envvar="TRIGFARM_OUT",
    help="Output HDF5 file; with --recipe a folder, default "
    "CACHE_DIR/RECIPE-backgroundN-signalM-seedS (env TRIGFARM_OUT).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=_default_cache_dir(),
    envvar="TRIGFARM_CACHE_DIR",
    help="Where --recipe datasets go by default (env TRIGFARM_CACHE_DIR).",
)
@click.option(
    "--layout",
    type=click.Choice(LAYOUTS),
    default="full",
    envvar="TRIGFARM_LAYOUT",
    help="Columns written with --process: all, or fat jets and features only "
    "(faster; --recipe datasets use their own) (env TRIGFARM_LAYOUT).",
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
    "--chunk-events",
    type=click.IntRange(min=1),
    default=10_240,
    envvar="TRIGFARM_CHUNK_EVENTS",
    help="With --recipe: events per chunk file, a multiple of --block-size "
    "(env TRIGFARM_CHUNK_EVENTS).",
)
@click.option("--verify", is_flag=True, help="With --recipe: check the chunks' checksums and exit.")
@click.option(
    "--repair", is_flag=True, help="With --recipe: regenerate chunks whose checksum changed."
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
    recipe_name: str | None,
    events: int,
    signal_events: int | None,
    out: Path | None,
    cache_dir: Path,
    layout: str,
    seed: int | None,
    workers: int,
    block_size: int,
    chunk_events: int,
    verify: bool,
    repair: bool,
    settings: tuple[str, ...],
    force: bool,
    list_processes: bool,
    quiet: bool,
) -> None:
    """Generate Pythia 8 + FastJet events of one process into a chunked HDF5 cache, or
    a named dataset (--recipe) into a folder of chunk files with a manifest.

    A process file records the recipe, seed, block size, detector and package versions;
    the same seed and block size give the same events for any number of workers. Ctrl-C
    leaves a valid file marked partial.

    A dataset, e.g. `trigfarm simulate --recipe lhco-like --events 1000000` (1M QCD
    dijets and 100k W'->XY after the 1.2 TeV fat-jet selection, features only), is
    written chunk by chunk; Ctrl-C keeps the finished chunks and the same command
    continues; the manifest holds the settings, seeds and a SHA-256 per chunk, and the
    files are the same bit for bit for any number of workers.
    """
    if list_processes:
        for name, recipe in PROCESSES.items():
            click.echo(f"{name:10s} id={recipe.process_id:<3d} {recipe.description}")
        for name, make in DATASET_RECIPES.items():
            click.echo(f"{name:10s} dataset: {make(1).description}")
        return
    if recipe_name is not None:
        if process_name is not None:
            raise click.UsageError("use either --process or --recipe, not both")
        if settings:
            raise click.UsageError("--set changes a --process recipe; a --recipe has no --set")
        _dataset(
            recipe_name,
            events,
            signal_events,
            out,
            cache_dir,
            1 if seed is None else seed,
            workers,
            block_size,
            chunk_events,
            verify=verify,
            repair=repair,
            quiet=quiet,
        )
        return
    if process_name is None or out is None:
        raise click.UsageError("--process and --out are required (or --recipe, or --list)")
    recipe = PROCESSES[process_name]
    changes: dict[str, Any] = {}
    try:
        changes = dict(parse_parameter(recipe, text) for text in settings)
        recipe = make_recipe(process_name, **changes)
    except ValidationError as exc:
        problem = config_error(exc, changes, process_name, type(recipe))
        raise click.BadParameter(str(problem), param_hint="--set") from None
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
        layout=layout,
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


def _dataset(
    recipe_name: str,
    events: int,
    signal_events: int | None,
    out: Path | None,
    cache_dir: Path,
    seed: int,
    workers: int,
    block_size: int,
    chunk_events: int,
    *,
    verify: bool,
    repair: bool,
    quiet: bool,
) -> None:
    recipe = DATASET_RECIPES[recipe_name](events, signal_events)
    if out is None:
        sizes = "-".join(f"{c.name}{c.n_events}" for c in recipe.components)
        out = cache_dir / f"{recipe.name}-{sizes}-seed{seed}"
    if verify:
        try:
            check = verify_dataset(out)
        except DataFileError as exc:
            raise click.ClickException(str(exc)) from exc
        for name in check.corrupted:
            click.echo(f"CHANGED  {out / name}", err=True)
        for name in check.missing:
            click.echo(f"MISSING  {out / name}", err=True)
        state = "complete" if check.complete else "incomplete"
        verdict = "ok" if check.ok else "BAD"
        click.echo(f"{out}: {check.n_chunks} chunks, {state}, checksums {verdict}")
        sys.exit(0 if check.ok else 1)
    try:
        result = produce_dataset(
            recipe,
            out,
            seed=seed,
            workers=workers,
            block_size=block_size,
            chunk_events=chunk_events,
            repair=repair,
            progress=not quiet,
            command=shlex.join(["trigfarm", *sys.argv[1:]]),
        )
    except (ValueError, DataFileError) as exc:
        raise click.ClickException(str(exc)) from exc
    counts = ", ".join(f"{n} {name}" for name, n in result.n_events.items())
    state = "complete" if result.complete else "INCOMPLETE (rerun the same command to continue)"
    click.echo(
        f"{out}: {counts}; {state}; this run made {result.made_events} events in "
        f"{result.elapsed_s:.1f} s ({result.events_per_s:.1f} events/s with {workers} "
        f"worker(s); Pythia tried {result.stats.tried}, selection kept {result.stats.kept})"
    )
    if result.interrupted:
        sys.exit(130)
