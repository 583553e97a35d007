"""Collision events from Pythia 8 and FastJet, a parametric detector, a cache and replay readers."""
