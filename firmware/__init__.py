"""The L1 model: a QKeras VAE, its hls4ml firmware, the bit-accurate emulator and board packages.

Only numpy-level modules are imported here; ``firmware.vae``, ``firmware.convert`` and
``firmware.boards`` need TensorFlow/hls4ml and are imported explicitly where used.
"""

from firmware.calibrate import Calibration, RateCalibration, calibrate, calibrate_threshold
from firmware.config import FixedType, LayerQuantization, QuantizationConfig, VAEConfig
from firmware.emulate import Emulator, load_emulator
from firmware.inputs import PT_SCALE_GEV, input_mask, round_to_fixed, scale_l1_objects
from firmware.model import DEFAULT_MODEL_DIR, L1Model, load_model
from firmware.scores import masked_mse, r_z, sum_mu2

__all__ = [
    "DEFAULT_MODEL_DIR",
    "PT_SCALE_GEV",
    "Calibration",
    "Emulator",
    "FixedType",
    "L1Model",
    "LayerQuantization",
    "QuantizationConfig",
    "RateCalibration",
    "VAEConfig",
    "calibrate",
    "calibrate_threshold",
    "input_mask",
    "load_emulator",
    "load_model",
    "masked_mse",
    "r_z",
    "round_to_fixed",
    "scale_l1_objects",
    "sum_mu2",
]
