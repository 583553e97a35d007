"""``trigfarm firmware``: train, calibrate and deploy the L1 VAE."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click
import numpy as np

from firmware.model import DEFAULT_MODEL_DIR


def _command_line() -> str:
    """The running command with every option spelled out (defaults included), to reproduce."""
    ctx = click.get_current_context()
    words = ["trigfarm", "firmware", ctx.command.name or ""]
    for param in ctx.command.params:
        if not isinstance(param, click.Option):
            continue
        value = ctx.params.get(param.name or "")
        if param.is_flag:
            if param.secondary_opts:
                words.append(param.opts[0] if value else param.secondary_opts[0])
            elif value:
                words.append(param.opts[0])
            continue
        if value is None:
            continue
        for item in value if param.multiple else (value,):
            words += [param.opts[0], str(item)]
    return shlex.join(words)


@click.group(context_settings={"show_default": True})
def firmware() -> None:
    """The L1 anomaly trigger: QKeras VAE, hls4ml firmware, calibration, board projects."""


@firmware.command()
@click.option(
    "--data",
    "data",
    multiple=True,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="TRIGFARM_L1_DATA",
    help="Background event cache(s) with l1_objects, e.g. from `trigfarm simulate --process "
    "l1bkg` (env TRIGFARM_L1_DATA).",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Model dir."
)
@click.option("--epochs", type=click.IntRange(min=1), default=60, help="Training epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, help="Minibatch size.")
@click.option("--beta", type=click.FloatRange(min=0), default=0.01, help="Weight of the KL term.")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=1e-3)
@click.option("--max-events", type=click.IntRange(min=0), default=0, help="0: all events.")
@click.option("--seed", type=int, default=1, help="Training seed.")
@click.option("--weight-bits", type=click.IntRange(2, 32), default=8, help="quantized_bits bits.")
@click.option("--weight-integer", type=click.IntRange(0, 31), default=3, help="... integer bits.")
@click.option("--relu-bits", type=click.IntRange(2, 32), default=8, help="quantized_relu bits.")
@click.option("--relu-integer", type=click.IntRange(0, 31), default=3, help="... integer bits.")
@click.option(
    "--scaling",
    type=click.Choice(["standard", "fixed"]),
    default="standard",
    help="Inputs standardised on this background (recorded in the card) or fixed pT/32 GeV.",
)
@click.option(
    "--min-std",
    type=click.FloatRange(min=0, min_open=True),
    default=0.01,
    help="Floor of a standardised input's std (pT/32 GeV, eta, phi units).",
)
def train(
    data: tuple[Path, ...],
    out: Path,
    epochs: int,
    batch_size: int,
    beta: float,
    learning_rate: float,
    max_events: int,
    seed: int,
    weight_bits: int,
    weight_integer: int,
    relu_bits: int,
    relu_integer: int,
    scaling: str,
    min_std: float,
) -> None:
    """Train the L1 VAE on background; write weights, loss-curve PNG and model card to --out."""
    from dataclasses import replace

    from firmware.config import QuantizationConfig, VAEConfig
    from firmware.inputs import (
        FIXED_SCALING,
        InputScaling,
        input_mask,
        read_l1_objects,
        round_to_fixed,
        scale_l1_objects,
    )

    vae = VAEConfig(
        epochs=epochs, batch_size=batch_size, beta=beta, learning_rate=learning_rate, seed=seed
    )
    quant = QuantizationConfig()
    hidden = {"activation_bits": relu_bits, "activation_integer": relu_integer}
    layers: dict[str, Any] = {
        name: replace(
            quant.layer(name),
            weight_bits=weight_bits,
            weight_integer=weight_integer,
            **(hidden if name.startswith("enc_") else {}),  # type: ignore[arg-type]
        )
        for name in ("enc_dense1", "enc_dense2", "z_mean", "z_log_var")
    }
    quant = replace(quant, **layers)
    objects, _ = read_l1_objects(data, max_events=max_events)
    fitted = InputScaling.fit(objects, min_std=min_std) if scaling == "standard" else FIXED_SCALING
    inputs = round_to_fixed(scale_l1_objects(objects, fitted), quant.input_fixed)
    mask = input_mask(objects)
    click.echo(f"training on {len(inputs)} events from {', '.join(map(str, data))}")
    click.echo("importing TensorFlow ...")
    from firmware import vae as vae_module

    def on_epoch(epoch: int, figures: dict[str, float]) -> None:
        text = "  ".join(f"{k} {v:.4f}" for k, v in figures.items())
        click.echo(f"epoch {epoch + 1:3d}/{epochs}  {text}")

    result = vae_module.train(inputs, mask, vae, quant, on_epoch=on_epoch)
    metrics = {
        "final_loss": result.history["loss"][-1],
        "final_val_loss": (result.history["val_loss"] or [float("nan")])[-1],
        "final_reco": result.history["reco"][-1],
        "final_kl": result.history["kl"][-1],
    }
    data_card = {
        "files": [_describe_cache(p) for p in data],
        "n_events": len(inputs),
        "validation_fraction": vae.validation_fraction,
    }
    vae_module.save_model(
        out,
        result,
        vae,
        quant,
        scaling=fitted,
        data=data_card,
        metrics=metrics,
        reproduce=_command_line(),
    )
    click.echo(
        f"wrote {out} (model_card.json, weights.npz, loss.png) in {result.elapsed_s:.1f} s "
        "of training; next: trigfarm firmware calibrate"
    )


def _describe_cache(path: Path) -> dict[str, object]:
    """Path, process, seed, events and the command that made an event cache."""
    from stream.eventfile import open_cache

    info = open_cache(path)
    keys = ("process", "seed", "n_events", "command", "created_utc")
    return {"path": str(path), **{k: info.attrs.get(k) for k in keys}}


def _scores(model_dir: Path, data: tuple[Path, ...], max_events: int, cache_dir: Path | None):
    from firmware.emulate import load_emulator
    from firmware.inputs import read_l1_objects, scale_l1_objects
    from firmware.model import load_model
    from firmware.scores import r_z

    model = load_model(model_dir)
    emulator = load_emulator(model, cache_dir=cache_dir)
    objects, weights = read_l1_objects(data, max_events=max_events)
    mu, log_var = emulator.encode(scale_l1_objects(objects, model.input_scaling))
    return model, r_z(mu, log_var), weights


_model_option = click.option(
    "--model",
    "model_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=DEFAULT_MODEL_DIR,
    help="Model directory.",
)


@firmware.command()
@_model_option
@click.option(
    "--data",
    multiple=True,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Background event cache(s), independent of the training sample.",
)
@click.option("--rate-hz", type=click.FloatRange(min=0, min_open=True), default=1000.0)
@click.option(
    "--input-rate-hz",
    type=click.FloatRange(min=0, min_open=True),
    default=4e7,
    help="The rate the sample stands for (the crossing rate): each of its N events counts "
    "input_rate_hz / N times its weight (1 for unweighted events).",
)
@click.option("--max-events", type=click.IntRange(min=0), default=0, help="0: all events.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    envvar="TRIGFARM_CACHE_DIR",
    help="Compiled-emulator cache (env TRIGFARM_CACHE_DIR; default ~/.cache/trigfarm).",
)
@click.option("--write/--no-write", default=True, help="Record the result in the model card.")
def calibrate(
    model_dir: Path,
    data: tuple[Path, ...],
    rate_hz: float,
    input_rate_hz: float,
    max_events: int,
    cache_dir: Path | None,
    write: bool,
) -> None:
    """Choose the R_z threshold for a target anomaly-trigger rate on background."""
    from firmware.calibrate import calibrate as calibrate_scores
    from firmware.model import write_card

    model, scores, weights = _scores(model_dir, data, max_events, cache_dir)
    try:
        result = calibrate_scores(
            scores, rate_hz=rate_hz, input_rate_hz=input_rate_hz, weights=weights
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(result.summary())
    if write:
        card = dict(model.card)
        card["calibration"] = {
            **result.to_dict(),
            "score": "r_z",
            "data": [str(p) for p in data],
            "command": _command_line(),
        }
        write_card(model.path, card)
        click.echo(f"recorded threshold {result.threshold:.6g} in {model.path}/model_card.json")


@firmware.command()
@click.option("--board", type=click.Choice(["pynq-z2", "zcu102", "alveo-u50"]), required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@_model_option
@click.option(
    "--data",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Event cache(s) for the test vectors; default: simulate l1bkg events.",
)
@click.option("--test-events", type=click.IntRange(min=1), default=100, help="tb_data events.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    envvar="TRIGFARM_CACHE_DIR",
    help="Compiled-emulator cache (env TRIGFARM_CACHE_DIR; default ~/.cache/trigfarm).",
)
@click.option("--csim/--no-csim", default=True, help="Run the g++ C-simulation check.")
@click.option("--build", is_flag=True, help="Run the vendor flow (needs Vivado on PATH).")
def deploy(
    board: str,
    out: Path,
    model_dir: Path,
    data: tuple[Path, ...],
    test_events: int,
    cache_dir: Path | None,
    csim: bool,
    build: bool,
) -> None:
    """Write the board project (hls4ml VivadoAccelerator), tb_data, driver and README."""
    from firmware import boards
    from firmware.emulate import load_emulator
    from firmware.inputs import read_l1_objects, scale_l1_objects
    from firmware.model import load_model

    model = load_model(model_dir)
    emulator = load_emulator(model, cache_dir=cache_dir)
    if data:
        objects, _ = read_l1_objects(data, max_events=test_events)
    else:
        from simulator import generate

        click.echo(f"simulating {test_events} l1bkg events for the test vectors ...")
        batches = list(generate("l1bkg", test_events, seed=12345, batch_size=test_events))
        objects = np.concatenate([b["l1_objects"] for b in batches])
    project = boards.write_board_project(
        model, board, out, scale_l1_objects(objects, model.input_scaling), emulator
    )
    click.echo(f"wrote {project.hls_dir} ({board}), tb_data, {project.driver}, {project.readme}")
    if csim:
        expected = boards.read_matrix(project.tb_outputs)
        got = boards.csim(project.hls_dir)
        bad = int((got != expected).any(axis=1).sum()) if got.shape == expected.shape else -1
        if bad:
            msg = f"C simulation differs from the emulator on {bad} of {len(expected)} events"
            raise click.ClickException(msg)
        click.echo(f"C simulation (g++): {len(got)} events, outputs identical to the emulator")
    if build:
        _require_vendor_tools(board)
        boards.build(project)
        click.echo("vendor flow finished; see the README for running on the board")


def _require_vendor_tools(board: str) -> None:
    import shutil

    from firmware.boards import MissingToolError

    tools = ["vivado"] + (["v++"] if board.startswith("alveo") else [])
    for tool in tools:
        if shutil.which(tool) is None:
            raise click.ClickException(str(MissingToolError(tool, f"build for {board}")))
