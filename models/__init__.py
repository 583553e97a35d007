"""Torch models shared by nodes and analysis: ParticleNet and the normalizing flows."""
