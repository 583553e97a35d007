"""The headline benchmark: ephemeral learning on LHCO R&D data, against keeping the events.

For each signal-to-background ratio S/B in the signal region (3.3-3.7 TeV), the LHCO
features (``../shared/data/lhco-rnd-100k``) are replayed through the real source
(``nodes.source.lhco_replay``), dealt batch by batch to ``--nodes`` flow learners
(``nodes.learner``, the OnlineFlow of each HLT node: all-data and sideband flows, single
pass) and into the archive (``nodes.archive``: flow snapshots and, for the baseline, every
event). All in one process. Then, from the archive alone:

    (a) CWoLa from flows         (b) CATHODE from flows (and the hybrid with stored SR events)
    (c) ANODE from flows         (d) CWoLa on the stored events (every event: the ceiling)
    (d') CWoLa on what the trigger keeps (a 1-in-10 prescale path)
    (e) idealised: stored SR events against independent true background

each scored by max SIC (working points with >= 25 test background events) and SIC at
ε_S = 0.2 on labelled test events that no step trained on. Bytes stored per event seen
are reported for flows and for events, and events/s trained per node. Each method's max
SIC is also given on two fixed halves of the test signal region (``max_sic_validation``,
``max_sic_test_half``), so that a setting (``--sr-replay``) is chosen on one half and
reported on the other.

Data split (files of lhco-rnd-100k): stream background bkg01-06, idealised background
bkg07-08, test background bkg09-10; injected signal sig01-03, test signal sig04-10.
``--dataset PATH`` runs it on a dataset made by ``trigfarm simulate --recipe lhco-like``
(the million-event headline), split by chunk: the last ``--test-fraction`` of the
background chunks are the test background (enough for >= 50k SR events at a million),
the ``--idealised-fraction`` before them the idealised background, the rest the stream;
the first half of the signal chunks is injected, the second half is test signal.
``--simulated N`` runs the same chain on a small ad-hoc simulator sample instead (N QCD
dijets in the stream, N/2 each for the idealised and test background, W'->XY signal),
generated once into ``--cache``.

    python -m benchmarks.ephemeral_lhco [--quick] [--sb 0 0.01 0.05] [--seeds 1 2 3] [--jobs 2]
    python -m benchmarks.ephemeral_lhco --dataset ~/.cache/trigfarm/datasets/lhco-like-...
    python -m benchmarks.ephemeral_lhco --simulated 6000 --sb 0.2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import queue
import shutil
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analysis.classifier import ClassifierConfig
from analysis.data import Events
from analysis.methods import FlowModels, SearchConfig
from analysis.metrics import roc
from analysis.report import MethodResult, evaluate, score_method, write_report
from models.archive import Archive
from nodes.archive import ArchiveConfig
from nodes.archive import build as build_archive
from nodes.learner import FlowLearner, FlowLearnerConfig, build_learner
from nodes.source import SourceConfig
from nodes.source import build as build_source
from simulator.dataset import dataset_files, verify_dataset
from simulator.production import simulate_to_file
from simulator.replay import read_features
from stream.batch import EventBatch, Record
from stream.transport import free_tcp_port

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lhco-rnd-100k"
#: The official raw LHCO format (700 particles x pT, eta, phi per event): what a trigger
#: that kept the events would store, beside the features our archive keeps.
RAW_EVENTS = DATA.parent / "lhco-rnd-raw-1k" / "events_anomalydetection_tiny.h5"
RAW_EVENTS_COUNT = 1000
SR = (3300.0, 3700.0)
METHOD_LABELS = {
    "cwola": "(a) CWoLa from flows",
    "cathode": "(b) CATHODE from flows",
    "cathode_hybrid": "(b') CATHODE hybrid (SR events stored)",
    "anode": "(c) ANODE from flows",
    "anode_interpolated": "(c') ANODE, all-data flow interpolated (any window)",
    "cwola_stored": "(d) CWoLa on stored events",
    "cwola_trigger": "(d') CWoLa on what the trigger keeps",
    "idealised": "(e) idealised (true bkg vs data)",
}
#: The searches that run on the archived flows alone (the bump hunt runs on their cuts).
FROM_FLOWS = ("cwola", "cathode", "anode", "anode_interpolated")
#: What the trigger stores of this stream, the benchmark's choice: a 1-in-10 prescale path
#: (``HLTConfig.prescale_n = 10``, as the default menu had before it was calibrated on
#: weighted crossings). Tag paths need jet constituents, which these features lack, and
#: every event here already passed a 1.2 TeV fat-jet selection, so on this stream the
#: prescale is what a menu would store beyond its selection.
TRIGGER_PRESCALE = 10
#: --dataset's split by chunk: the test share holds >= 50k SR background events at a million
TEST_FRACTION, IDEALISED_FRACTION = 0.38, 0.05


def files(kind: str, numbers: range) -> list[str]:
    return [str(DATA / f"scalars_{kind}{i:02d}.h5") for i in numbers]


def sr_fraction(events: Events) -> float:
    return float(events.in_window(SR).mean())


@dataclass(frozen=True)
class Dataset:
    """Where each part of the benchmark's events comes from (source component specs)."""

    name: str
    stream_background: str
    injected_signal: str
    idealised_background: str
    test: tuple[str, ...]


def lhco_dataset(quick: bool) -> Dataset:
    def spec(kind: str, numbers: range) -> str:
        return f"lhco-features:{','.join(files(kind, numbers))}"

    return Dataset(
        "LHCO R&D 100k",
        spec("bkg", range(1, 3) if quick else range(1, 7)),
        spec("sig", range(1, 4)),
        spec("bkg", range(7, 9)),
        (spec("bkg", range(9, 11)), spec("sig", range(4, 11))),
    )


def simulated_dataset(n_background: int, folder: Path, seed: int) -> Dataset:
    """QCD dijets and W'->XY (m = 3.5 TeV, 500 GeV, 100 GeV) from the simulator, cached."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {
        "qcd_stream": ("qcd", n_background),
        "qcd_ideal": ("qcd", n_background // 2),
        "qcd_test": ("qcd", n_background // 2),
        "wprime_inject": ("wprime", max(200, n_background // 10)),
        "wprime_test": ("wprime", max(200, n_background // 10)),
    }
    for i, (name, (process, n)) in enumerate(sizes.items()):
        path = folder / f"{name}_{n}_{seed}.h5"
        if not path.exists():
            print(f"generating {n} {process} events into {path}")
            simulate_to_file(process, n, path, seed=seed * 100 + i, workers=2, progress=False)
    spec = {name: f"cache:{folder / f'{name}_{n}_{seed}.h5'}" for name, (_, n) in sizes.items()}
    return Dataset(
        f"simulated QCD + W'->XY ({n_background} stream background events)",
        spec["qcd_stream"],
        spec["wprime_inject"],
        spec["qcd_ideal"],
        (spec["qcd_test"], spec["wprime_test"]),
    )


def cache_spec(paths: list[Path]) -> str:
    """The source component spec that replays these event-cache files in order."""
    return "cache:" + ",".join(str(p) for p in paths)


def require_complete(path: Path) -> None:
    """Refuse a ``trigfarm simulate --recipe`` dataset that is unfinished or corrupted.

    Raises:
        SystemExit: says which chunks and how to finish or repair the dataset.
    """
    check = verify_dataset(path)
    if not (check.ok and check.complete):
        msg = (
            f"dataset {path} is not usable (complete={check.complete}, corrupted "
            f"{list(check.corrupted)[:3]}, missing {list(check.missing)[:3]}): rerun the "
            "`trigfarm simulate --recipe ...` command that made it to finish or --repair it"
        )
        raise SystemExit(msg)


def generated_dataset(path: Path, test_fraction: float, idealised_fraction: float) -> Dataset:
    """A ``trigfarm simulate --recipe`` dataset, split by chunk (see the module doc).

    Raises:
        SystemExit: the dataset is incomplete or a chunk fails its checksum (says which).
    """
    require_complete(path)
    background, signal = dataset_files(path, "background"), dataset_files(path, "signal")
    n_test = max(1, round(len(background) * test_fraction))
    n_ideal = max(1, round(len(background) * idealised_fraction))
    n_stream = len(background) - n_test - n_ideal
    if n_stream < 1 or len(signal) < 2:
        msg = f"dataset {path} has too few chunks to split ({len(background)} background)"
        raise SystemExit(msg)

    half = len(signal) // 2
    return Dataset(
        f"{path.name} ({n_stream} of {len(background)} background chunks streamed)",
        cache_spec(background[:n_stream]),
        cache_spec(signal[:half]),
        cache_spec(background[n_stream : n_stream + n_ideal]),
        (cache_spec(background[n_stream + n_ideal :]), cache_spec(signal[half:])),
    )


def stream_once(
    sb: float,
    dataset: Dataset,
    *,
    n_nodes: int,
    learner_config: FlowLearnerConfig,
    archive_dir: Path,
    seed: int,
    p_bkg_sr: float,
    p_sig_sr: float,
    n_background: int,
) -> dict[str, Any]:
    """Replay the stream through learners and archive; returns counts and timings."""
    ratio = sb * p_bkg_sr / p_sig_sr  # S/(B) over the whole stream for the wanted SR S/B
    fraction = ratio / (1 + ratio)
    n_events = int(n_background / (1 - fraction))  # every background event once
    source = build_source(
        SourceConfig(
            background=(dataset.stream_background,),
            signal=(dataset.injected_signal,),
            signal_fraction=fraction,
            loop=False,
            max_events=n_events,
            batch_size=1000,
            events_per_lumi=10_000,
            seed=seed,
        ),
        name="source",
    )
    rendezvous = replace(learner_config, average_address=f"tcp://127.0.0.1:{free_tcp_port()}")
    learners = [
        build_learner(rendezvous, node_id=f"hlt-{i}", node_index=i, node_count=n_nodes)
        for i in range(n_nodes)
    ]
    archive = build_archive(ArchiveConfig(out_dir=str(archive_dir)), name="archive")
    # Each learner runs in its own thread, as each HLT node runs in its own process, so
    # that averaging nodes meet in their collectives; the archive stays on this thread.
    inboxes: list[queue.Queue[EventBatch | None]] = [queue.Queue(4) for _ in learners]
    records: queue.Queue[Record] = queue.Queue()

    def node(learner: FlowLearner, inbox: queue.Queue[EventBatch | None]) -> None:
        while (batch := inbox.get()) is not None:
            for record in learner.learn(batch):
                records.put(record)
        for record in learner.finish():
            records.put(record)

    threads = [
        threading.Thread(target=node, args=(learner, inbox), daemon=True)
        for learner, inbox in zip(learners, inboxes, strict=True)
    ]
    for thread in threads:
        thread.start()
    n_batches = n_signal_sr = n_background_sr = 0
    t0 = time.perf_counter()
    while (outcome := source.produce()) is not None:
        for emit in outcome.emits:
            batch = emit.message
            assert isinstance(batch, EventBatch)
            in_sr = (batch["features"][:, 0] >= SR[0]) & (batch["features"][:, 0] < SR[1])
            signal = batch.truth["is_signal"].astype(bool)
            n_signal_sr += int((in_sr & signal).sum())
            n_background_sr += int((in_sr & ~signal).sum())
            inboxes[n_batches % n_nodes].put(batch.without_truth())
            archive.process(batch.without_truth())  # the conventional path keeps everything
            n_batches += 1
            while not records.empty():
                archive.process(records.get())
    for inbox in inboxes:
        inbox.put(None)
    for thread in threads:
        thread.join()
    while not records.empty():
        archive.process(records.get())
    archive.finish()
    wall_s = time.perf_counter() - t0
    reports = [learner.report() for learner in learners]
    return {
        "signal_fraction": fraction,
        "events": source.emitted,
        "signal_events": source.signal_emitted,
        "sr_signal": n_signal_sr,
        "sr_background": n_background_sr,
        "sr_s_over_b": n_signal_sr / max(n_background_sr, 1),
        "stream_wall_s": wall_s,
        "events_per_s_trained_per_node": [r["events_per_s_trained"] for r in reports],
        "not_learned_total": sum(r["not_learned_total"] for r in reports),
        "final_loss": [r["flows"].get("all", {}).get("loss") for r in reports],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 files, tiny training")
    parser.add_argument(
        "--sb",
        type=float,
        nargs="+",
        default=[0.0, 0.003, 0.006, 0.01, 0.02, 0.05],
        help="S/B in the SR; 0 is the no-signal control",
    )
    parser.add_argument("--nodes", type=int, default=2, help="HLT nodes (flows per role)")
    parser.add_argument("--members", type=int, default=5, help="MAFs per flow (an ensemble)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="one run per seed")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once (processes)")
    parser.add_argument(
        "--mixture", action="store_true", help="each node keeps its own flow (no averaging)"
    )
    parser.add_argument(
        "--out",
        default="out/ephemeral_lhco",
        help="plots and JSON; a (seed, S/B) whose row.json is there is not run again",
    )
    parser.add_argument("--keep-archive", action="store_true", help="keep archives under --out")
    parser.add_argument(
        "--sr-replay",
        type=int,
        help="optimizer steps per event in the signal-region flows (default: the shipped one)",
    )
    parser.add_argument(
        "--sr-folds",
        type=int,
        help="signal-region flows, each learning all folds but one (default: the shipped K)",
    )
    parser.add_argument(
        "--simulated",
        type=int,
        default=0,
        metavar="N",
        help="use N simulated QCD events (and W'->XY signal) instead of LHCO",
    )
    parser.add_argument("--cache", default="out/sim_cache", help="where simulated events are kept")
    parser.add_argument(
        "--dataset",
        type=Path,
        help="a `trigfarm simulate --recipe lhco-like` folder instead of LHCO (split by chunk)",
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=TEST_FRACTION,
        help="with --dataset: share of background chunks held out as test",
    )
    parser.add_argument(
        "--idealised-fraction",
        type=float,
        default=IDEALISED_FRACTION,
        help="with --dataset: share of background chunks for the idealised classifier",
    )
    return parser


def choose_dataset(args: argparse.Namespace, seed: int) -> Dataset:
    if args.dataset:
        return generated_dataset(
            args.dataset.expanduser(), args.test_fraction, args.idealised_fraction
        )
    if args.simulated:
        return simulated_dataset(args.simulated, Path(args.cache), seed)
    return lhco_dataset(args.quick)


def run_seed(args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    """Every S/B of one seed; each finished row is written to ``OUT/seed_S/sb_X/row.json``
    and read back instead of rerun, so an interrupted run continues."""
    torch.set_num_threads(1)
    out = Path(args.out) / f"seed_{seed}"
    out.mkdir(parents=True, exist_ok=True)
    overrides: dict[str, Any] = {"batch_size": 64} if args.quick else {}
    if args.sr_replay is not None:
        overrides["signal_region_replay"] = args.sr_replay
    if args.sr_folds is not None:
        overrides["signal_region_folds"] = args.sr_folds
    learner_config = FlowLearnerConfig(
        n_transforms=2 if args.quick else 4,
        **overrides,
        n_members=args.members,
        seed=seed,
        calibration_events=2000,
        snapshot_every_events=20_000,
        signal_region_gev=SR,
        # as the default farm: one flow averaged across the HLT nodes (--mixture: per node)
        average_every_steps=0 if args.mixture else 10,
    )
    search = SearchConfig(
        signal_region_gev=SR,
        n_samples=5000 if args.quick else 40_000,
        classifier=ClassifierConfig(
            n_models=1 if args.quick else 3, epochs=3 if args.quick else 20, seed=seed
        ),
        seed=seed,
    )
    dataset = choose_dataset(args, seed)
    test = Events(*read_features(list(dataset.test)))
    true_background = Events(*read_features([dataset.idealised_background]))
    stream_bkg = Events(*read_features([dataset.stream_background]))
    injected = Events(*read_features([dataset.injected_signal]))
    p_bkg_sr, p_sig_sr = sr_fraction(stream_bkg), sr_fraction(injected)
    test_sr = test.select(test.in_window(SR))
    assert test_sr.is_signal is not None
    # Two fixed halves of the test SR (the same for every seed): choose on one, report the other.
    in_validation = np.random.default_rng(0).permutation(len(test_sr)) % 2 == 0
    halves = {
        half: (test_sr.select(mask), test_sr.is_signal[mask])
        for half, mask in (("validation", in_validation), ("test_half", ~in_validation))
    }
    print(
        f"seed {seed}: test SR {int(test_sr.is_signal.sum())} signal, "
        f"{int((~test_sr.is_signal).sum())} background; stream {len(stream_bkg)} background "
        f"events, {p_bkg_sr:.3f} in SR; injected signal {p_sig_sr:.3f} in SR"
    )
    raw_bytes_per_event = (
        RAW_EVENTS.stat().st_size / RAW_EVENTS_COUNT if RAW_EVENTS.exists() else None
    )
    rows = []
    for sb in args.sb:
        row_file = out / f"sb_{sb:g}" / "row.json"
        if row_file.exists():
            rows.append(json.loads(row_file.read_text()))
            print(f"seed {seed}, S/B {sb:g}: done before ({row_file})")
            continue
        tmp = Path(tempfile.mkdtemp(prefix="ephemeral-"))
        archive_dir = tmp / "archive"
        t0 = time.perf_counter()
        stream = stream_once(
            sb,
            dataset,
            n_nodes=args.nodes,
            learner_config=learner_config,
            archive_dir=archive_dir,
            seed=seed,
            p_bkg_sr=p_bkg_sr,
            p_sig_sr=p_sig_sr,
            n_background=len(stream_bkg),
        )
        archive = Archive(archive_dir)
        problems = archive.verify()
        models = FlowModels.from_snapshots(archive.snapshots(latest_per_node=True))
        stored = Events(archive.event_features().astype(np.float64))
        results: list[MethodResult] = []
        timings = {}
        half_sic: dict[str, dict[str, float]] = {}
        # What the trigger stores: the prescale path's every 10th event, in stream order.
        trigger_kept = Events(stored.features[::TRIGGER_PRESCALE])
        for name in METHOD_LABELS:
            t_method = time.perf_counter()
            if name == "cwola_trigger":
                score = score_method("cwola_stored", models, search, stored=trigger_kept)
            else:
                score = score_method(
                    name, models, search, stored=stored, true_background=true_background
                )
            bump_on = stored if name in FROM_FLOWS else None
            results.append(evaluate(name, score, test, search, bump_events=bump_on))
            half_sic[name] = {
                f"max_sic_{half}": roc(score(events.features), truth).max_sic()
                for half, (events, truth) in halves.items()
            }
            timings[name] = time.perf_counter() - t_method
        storage = archive.storage()
        summary = write_report(
            results,
            out / f"sb_{sb:g}",
            search,
            {
                "s_over_b_target": sb,
                "stream": stream,
                "storage": storage,
                "timings_s": timings,
                "archive_problems": problems,
            },
            title=f"{dataset.name}, S/B in SR = {stream['sr_s_over_b']:.4f}",
        )
        row = {
            "sb_target": sb,
            **{k: stream[k] for k in ("sr_s_over_b", "sr_signal", "sr_background", "events")},
            "events_per_s_trained_per_node": float(
                np.mean(stream["events_per_s_trained_per_node"])
            ),
            "not_learned_total": stream["not_learned_total"],
            "flow_bytes_per_event_latest": storage["flow_bytes_per_event_seen_latest"],
            "flow_bytes_per_event_all_snapshots": storage[
                "flow_bytes_per_event_seen_all_snapshots"
            ],
            "event_bytes_per_event": storage["event_bytes_per_event_stored"],
            "raw_event_bytes_per_event": raw_bytes_per_event,
            "methods": {
                name: {
                    "max_sic": figures["max_sic"],
                    "sic_at_0.2": figures["sic_at_eff_s_0.2"],
                    "bkg_at_0.2": figures["background_events_at_eff_s_0.2"],
                    "auc": figures["auc"],
                    **half_sic[name],
                }
                for name, figures in summary["methods"].items()
            },
            "wall_s": time.perf_counter() - t0,
        }
        sic = {name: m["max_sic"] for name, m in row["methods"].items()}
        row["ratios"] = {
            name: {
                "to_stored_everything": sic[name] / sic["cwola_stored"],
                "to_trigger_stored": sic[name] / sic["cwola_trigger"],
            }
            for name in (*FROM_FLOWS, "cathode_hybrid")
        }
        flow_bytes = row["flow_bytes_per_event_latest"]
        row["events_to_flow_bytes"] = {
            "features": row["event_bytes_per_event"] / flow_bytes if flow_bytes else None,
            "raw": raw_bytes_per_event / flow_bytes if flow_bytes and raw_bytes_per_event else None,
        }
        row["seed"] = seed
        row["signal_region_replay"] = learner_config.signal_region_replay
        row["signal_region_folds"] = learner_config.signal_region_folds
        row["test_sr_background"] = int((~test_sr.is_signal).sum())
        row["stream_background_events"] = len(stream_bkg)
        rows.append(row)
        print(
            f"\nseed {seed}, S/B target {sb:g}: SR S/B {row['sr_s_over_b']:.4f} "
            f"({row['sr_signal']} signal / {row['sr_background']} background in SR, "
            f"{row['events']} events); {row['events_per_s_trained_per_node']:.0f} events/s "
            f"trained per node, not learned {row['not_learned_total']}; {row['wall_s']:.0f} s"
        )
        for name, label in METHOD_LABELS.items():
            m = row["methods"][name]
            print(
                f"  {label:42s} max SIC {m['max_sic']:5.2f}  SIC@0.2 {m['sic_at_0.2']:5.2f} "
                f"({m['bkg_at_0.2']} bkg)  AUC {m['auc']:.3f}  halves (validation, test) "
                f"{m['max_sic_validation']:.2f}, {m['max_sic_test_half']:.2f}"
            )
        print(
            f"  bytes per event: flows {row['flow_bytes_per_event_latest']:.2f} (latest), "
            f"{row['flow_bytes_per_event_all_snapshots']:.2f} (all snapshots); events "
            f"{row['event_bytes_per_event']:.1f} as features, {raw_bytes_per_event or 0:.0f} raw "
            f"(events/flows: {row['events_to_flow_bytes']})"
        )
        if args.keep_archive:
            shutil.copytree(archive_dir, out / f"sb_{sb:g}" / "archive", dirs_exist_ok=True)
        shutil.rmtree(tmp)
        row_file.write_text(json.dumps(row, indent=2, default=float))
    return rows


def _mean_std(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "std": float(array.std()), "n": len(array)}


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per S/B: mean and std over seeds of each method's max SIC and of the ratios (taken
    per seed, then averaged), and of the stream's S/B and bytes."""
    out = []
    for sb in sorted({row["sb_target"] for row in rows}):
        group = [row for row in rows if row["sb_target"] == sb]
        out.append(
            {
                "sb_target": sb,
                "seeds": sorted(row["seed"] for row in group),
                "sr_s_over_b": _mean_std([row["sr_s_over_b"] for row in group]),
                "sr_signal": _mean_std([row["sr_signal"] for row in group]),
                "max_sic": {
                    name: _mean_std([row["methods"][name]["max_sic"] for row in group])
                    for name in METHOD_LABELS
                },
                "auc": {
                    name: _mean_std([row["methods"][name]["auc"] for row in group])
                    for name in METHOD_LABELS
                },
                **{
                    f"max_sic_{half}": {
                        name: _mean_std([row["methods"][name][f"max_sic_{half}"] for row in group])
                        for name in METHOD_LABELS
                    }
                    for half in ("validation", "test_half")
                    if all(f"max_sic_{half}" in row["methods"]["anode"] for row in group)
                },
                "ratios": {
                    name: {
                        kind: _mean_std([row["ratios"][name][kind] for row in group])
                        for kind in ("to_stored_everything", "to_trigger_stored")
                    }
                    for name in group[0]["ratios"]
                },
                "events_to_flow_bytes": {
                    kind: _mean_std([row["events_to_flow_bytes"][kind] or 0.0 for row in group])
                    for kind in ("features", "raw")
                },
                "events_per_s_trained_per_node": _mean_std(
                    [row["events_per_s_trained_per_node"] for row in group]
                ),
            }
        )
    return out


def print_table(summary: list[dict[str, Any]]) -> None:
    """The headline table: max SIC, mean ± std over seeds, one column per S/B."""
    head = " | ".join(
        f"S/B {s['sr_s_over_b']['mean']:.2%} ({s['sr_signal']['mean']:.0f} sig)" for s in summary
    )
    print(f"\n| method | {head} |")
    print("|---|" + "---|" * len(summary))
    for name, label in METHOD_LABELS.items():
        cells = " | ".join(
            f"{s['max_sic'][name]['mean']:.2f} ± {s['max_sic'][name]['std']:.2f}" for s in summary
        )
        print(f"| {label} | {cells} |")
    for name in ("cathode", "anode", "anode_interpolated"):
        for kind, label in (("to_stored_everything", "ceiling"), ("to_trigger_stored", "trigger")):
            cells = " | ".join(
                f"{s['ratios'][name][kind]['mean']:.2f} ± {s['ratios'][name][kind]['std']:.2f}"
                for s in summary
            )
            print(f"| {name} / {label} | {cells} |")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.simulated or args.dataset) and not DATA.exists():
        print(f"no data at {DATA} (see ../shared/data/README.md)")
        return 1
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if args.jobs > 1 and len(args.seeds) > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(args.jobs, len(args.seeds)), mp_context=context) as pool:
            for seed_rows in pool.map(run_seed, [args] * len(args.seeds), args.seeds):
                rows += seed_rows
    else:
        for seed in args.seeds:
            rows += run_seed(args, seed)
    summary = aggregate(rows)
    print_table(summary)
    final = {
        "benchmark": "ephemeral_lhco",
        "dataset": choose_dataset(args, args.seeds[0]).name,
        "quick": args.quick,
        "nodes": args.nodes,
        "seeds": args.seeds,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 torch thread per learner",
        "total_s": time.perf_counter() - t_start,
        "summary": summary,
        "rows": rows,
    }
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(final, indent=2, default=float))
    print(json.dumps(final, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
