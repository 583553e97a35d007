"""Collision events from Pythia 8 and FastJet, a parametric detector, a cache and replay readers.

Generate events of a named process (see ``PROCESSES``) as ``stream.EventBatch`` batches:

    >>> from simulator import PROCESSES, generate
    >>> sorted(PROCESSES)[:3]
    ['a4l', 'htautau', 'l1bkg']
"""

from simulator.cms_l1ad import read_cms_l1ad
from simulator.detector import CellGrid, DetectorModel, Reconstruction
from simulator.errors import DataFileError
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
    fatjet_content,
    l1_layout,
    l1_objects,
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

__all__ = [
    "LHCO_PROCESS_IDS",
    "PROCESSES",
    "BosonJet",
    "CellGrid",
    "DataFileError",
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
    "derived_seed",
    "fatjet_content",
    "generate",
    "l1_layout",
    "l1_objects",
    "make_pythia",
    "make_recipe",
    "open_lhco_features",
    "parse_parameter",
    "read_cms_l1ad",
    "read_lhco_features",
    "read_lhco_raw",
    "read_root_objects",
    "read_top_landscape",
    "resolve",
    "single_jet_content",
]
