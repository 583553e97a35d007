"""``trigfarm hlt train`` on simulator caches: checkpoint, card, ROC plots, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from deploy.cli import main
from models.checkpoint import load_checkpoint
from models.particlenet_training import load_labelled_jets, split_indices
from simulator import Recipe, generate, make_recipe
from stream.eventfile import CacheWriter

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hlt-train")
    recipes: dict[str, Recipe | str] = {
        "qcd": make_recipe("qcd", pthat_min_gev=400.0),
        "ttbar": "ttbar",
    }
    out = {}
    for seed, (name, recipe) in enumerate(recipes.items()):
        path = root / f"{name}.h5"
        with CacheWriter(path) as writer:
            for batch in generate(recipe, 60, seed=seed + 7, batch_size=60):
                writer.append(batch)
        out[name] = path
    return out


@pytest.mark.slow
def test_train_writes_a_loadable_checkpoint(caches: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "tagger"
    args = ["hlt", "train", "--data", str(caches["qcd"]), "--data", str(caches["ttbar"])]
    args += ["--classes", "qcd,top", "--out", str(out), "--epochs", "2", "--batch-size", "32"]
    args += ["--jets", "both"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "epoch   2" in result.output and "top vs qcd: AUC" in result.output
    card = json.loads((out / "model.json").read_text())
    assert card["classes"] == ["qcd", "top"] and card["training"]["jets_per_class"] == {
        "qcd": 120,
        "top": 120,
    }
    assert len(card["history"]) == 2 and card["mahalanobis_fitted"]
    assert (out / "roc_top_vs_qcd.png").stat().st_size > 1000
    tagger = load_checkpoint(out)
    assert tagger.model.config.n_classes == 2 and tagger.mahalanobis.fitted

    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0 and "--force" in again.output


def test_bad_data_is_named(caches: dict[str, Path], tmp_path: Path) -> None:
    args = ["hlt", "train", "--data", str(caches["qcd"]), "--classes", "qcd,w,top"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "one cache file per class" in result.output


def test_heavier_jets_and_a_seeded_split(caches: dict[str, Path]) -> None:
    data = load_labelled_jets([caches["qcd"], caches["ttbar"]], ("qcd", "top"))
    assert data.counts() == {"qcd": 60, "top": 60}
    assert (data.inputs.n_real > 0).all()
    a = split_indices(100, val_fraction=0.1, test_fraction=0.2, seed=4)
    b = split_indices(100, val_fraction=0.1, test_fraction=0.2, seed=4)
    assert [len(x) for x in a] == [70, 10, 20]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert np.array_equal(np.sort(np.concatenate(a)), np.arange(100))
