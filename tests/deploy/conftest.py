"""Helpers for farm tests: small topologies written to temporary files."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest


def write_topology(path: Path, table: dict[str, Any]) -> Path:
    """Write a topology given as nested dicts (one level of sub-tables) as TOML."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    for section, body in table.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in body.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def synthetic_table(events: int = 2000, **farm: Any) -> dict[str, Any]:
    """A source -> relay x2 -> sink farm of synthetic roles."""
    return {
        "farm": {"name": "t", "chain": ["source", "relay", "sink"], "drain_idle_s": 0.3, **farm},
        "source": {"role": "synthetic-source", "config": {"events": events, "batch_size": 100}},
        "relay": {"count": 2},
        "sink": {},
    }


def default_table() -> dict[str, Any]:
    """The shipped default topology as plain data, with an explicit L1 threshold only while
    the shipped L1 model carries no calibration (``trigfarm firmware calibrate`` writes one
    into its model card)."""
    from deploy.topology import TOPOLOGY_DIR
    from firmware.model import load_model

    table = tomllib.loads((TOPOLOGY_DIR / "default.toml").read_text())
    l1 = table["l1"].setdefault("config", {})
    if "threshold" not in l1 and load_model(l1.get("model_dir")).threshold is None:
        l1["threshold"] = 5.0
    return table


@pytest.fixture
def topo_file(tmp_path: Path):
    def make(table: dict[str, Any]) -> Path:
        return write_topology(tmp_path / "topology.toml", table)

    return make
