"""Collision events from Pythia 8 and FastJet, a parametric detector, and replay readers.

Generate events of a named process (see ``PROCESSES``) as ``stream.EventBatch`` batches:

    >>> from simulator import PROCESSES, generate
    >>> sorted(PROCESSES)[:3]
    ['a4l', 'htautau', 'inclusive']

Names load on first use (PEP 562), so ``import simulator.replay`` never loads Pythia or
FastJet; a name whose module needs a package that is not installed raises
``ImportError`` with the install command. The event file format is ``stream.eventfile``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simulator.cms_l1ad import read_cms_l1ad
    from simulator.dataset import DATASET_RECIPES, DatasetRecipe, produce_dataset, verify_dataset
    from simulator.detector import CellGrid, DetectorModel, Reconstruction
    from simulator.generator import (
        EventGenerator,
        GeneratorStats,
        derived_seed,
        generate,
        make_pythia,
        resolve,
    )
    from simulator.jets import (
        FatJetContent,
        JetConfig,
        cluster_fatjets,
        fatjet_content,
        l1_layout,
        l1_objects,
        nsubjettiness,
        single_jet_content,
    )
    from simulator.lhco_features import LHCO_PROCESS_IDS, open_lhco_features, read_lhco_features
    from simulator.lhco_raw import read_lhco_raw
    from simulator.particles import Particles
    from simulator.recipes import (
        PROCESSES,
        BosonJet,
        EventFilter,
        HiggsTauTau,
        L1Background,
        MinimumBias,
        QCDDijet,
        Recipe,
        ScalarToFourLeptons,
        TopPair,
        WprimeXY,
        WToLepton,
        ZToLeptons,
        make_recipe,
        parse_parameter,
    )
    from simulator.root_objects import read_root_objects
    from simulator.top_landscape import read_top_landscape
    from stream.errors import DataFileError

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "read_cms_l1ad": "simulator.cms_l1ad",
    "DATASET_RECIPES": "simulator.dataset",
    "DatasetRecipe": "simulator.dataset",
    "produce_dataset": "simulator.dataset",
    "verify_dataset": "simulator.dataset",
    "CellGrid": "simulator.detector",
    "DetectorModel": "simulator.detector",
    "Reconstruction": "simulator.detector",
    "DataFileError": "stream.errors",
    "EventGenerator": "simulator.generator",
    "GeneratorStats": "simulator.generator",
    "derived_seed": "simulator.generator",
    "generate": "simulator.generator",
    "make_pythia": "simulator.generator",
    "resolve": "simulator.generator",
    "FatJetContent": "simulator.jets",
    "JetConfig": "simulator.jets",
    "cluster_fatjets": "simulator.jets",
    "fatjet_content": "simulator.jets",
    "l1_layout": "simulator.jets",
    "l1_objects": "simulator.jets",
    "nsubjettiness": "simulator.jets",
    "single_jet_content": "simulator.jets",
    "LHCO_PROCESS_IDS": "simulator.lhco_features",
    "open_lhco_features": "simulator.lhco_features",
    "read_lhco_features": "simulator.lhco_features",
    "read_lhco_raw": "simulator.lhco_raw",
    "Particles": "simulator.particles",
    "PROCESSES": "simulator.recipes",
    "BosonJet": "simulator.recipes",
    "EventFilter": "simulator.recipes",
    "HiggsTauTau": "simulator.recipes",
    "L1Background": "simulator.recipes",
    "MinimumBias": "simulator.recipes",
    "QCDDijet": "simulator.recipes",
    "Recipe": "simulator.recipes",
    "ScalarToFourLeptons": "simulator.recipes",
    "TopPair": "simulator.recipes",
    "WprimeXY": "simulator.recipes",
    "WToLepton": "simulator.recipes",
    "ZToLeptons": "simulator.recipes",
    "make_recipe": "simulator.recipes",
    "parse_parameter": "simulator.recipes",
    "read_root_objects": "simulator.root_objects",
    "read_top_landscape": "simulator.top_landscape",
}

#: Third-party module -> the distribution that provides it (for the install hint).
_DISTRIBUTIONS = {
    "pythia8mc": "pythia8mc",
    "fastjet": "fastjet",
    "awkward": "awkward",
    "uproot": "uproot",
    "pandas": "pandas",
    "tables": "tables",
    "h5py": "h5py",
}

__all__ = [
    "DATASET_RECIPES",
    "LHCO_PROCESS_IDS",
    "PROCESSES",
    "BosonJet",
    "CellGrid",
    "DataFileError",
    "DatasetRecipe",
    "DetectorModel",
    "EventFilter",
    "EventGenerator",
    "FatJetContent",
    "GeneratorStats",
    "HiggsTauTau",
    "JetConfig",
    "L1Background",
    "MinimumBias",
    "Particles",
    "QCDDijet",
    "Recipe",
    "Reconstruction",
    "ScalarToFourLeptons",
    "TopPair",
    "WToLepton",
    "WprimeXY",
    "ZToLeptons",
    "cluster_fatjets",
    "derived_seed",
    "fatjet_content",
    "generate",
    "l1_layout",
    "l1_objects",
    "make_pythia",
    "make_recipe",
    "nsubjettiness",
    "open_lhco_features",
    "parse_parameter",
    "produce_dataset",
    "read_cms_l1ad",
    "read_lhco_features",
    "read_lhco_raw",
    "read_root_objects",
    "read_top_landscape",
    "resolve",
    "single_jet_content",
    "verify_dataset",
]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        msg = f"module 'simulator' has no attribute {name!r}"
        raise AttributeError(msg)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in _DISTRIBUTIONS:
            raise
        msg = (
            f"simulator.{name} needs the package {_DISTRIBUTIONS[missing]!r}, which is not "
            f'installed; install the project with: pip install -e ".[dev]" '
            f"(or pip install {_DISTRIBUTIONS[missing]})"
        )
        raise ImportError(msg, name=exc.name) from exc
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
