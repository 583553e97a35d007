"""The farm's node processes: source, L1, HLT and archive (one runnable module each)."""
