"""The L1 model: a QKeras VAE, its hls4ml firmware, the bit-accurate emulator and board packages."""
