"""Offline anomaly searches on archived flows: CWoLa, CATHODE and ANODE."""

from analysis.methods import METHODS, FlowModels, SearchConfig
from analysis.metrics import Roc, roc
from analysis.report import analyze

__all__ = ["METHODS", "FlowModels", "Roc", "SearchConfig", "analyze", "roc"]
