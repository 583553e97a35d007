"""Offline anomaly searches on archived flows: CWoLa, CATHODE and ANODE."""
