"""The 57 L1 inputs: scaling of the 19 x (pT, eta, phi) objects and rounding to firmware types.

Scaling (fixed, documented, no fitted statistics): pT is divided by ``PT_SCALE_GEV`` = 32
GeV (a 5-bit shift of the hardware pT word), eta and phi are used as they are. The
(19, 3) objects are flattened object by object: (pT, eta, phi) of MET, 4 e/gamma,
4 muons, 10 jets. An object with pT = 0 is padding; the loss ignores its three inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from firmware.config import FixedType
from stream.schema import N_L1_OBJECTS

PT_SCALE_GEV = 32.0
N_INPUTS = N_L1_OBJECTS * 3


def scale_l1_objects(l1_objects: np.ndarray) -> np.ndarray:
    """(N, 19, 3) objects in GeV -> (N, 57) float32 network inputs (pT / 32 GeV, eta, phi)."""
    objects = np.asarray(l1_objects, dtype=np.float32)
    if objects.ndim != 3 or objects.shape[1:] != (N_L1_OBJECTS, 3):
        msg = f"l1_objects must have shape (N, {N_L1_OBJECTS}, 3), got {objects.shape}"
        raise ValueError(msg)
    scaled = objects.copy()
    scaled[:, :, 0] /= np.float32(PT_SCALE_GEV)
    return scaled.reshape(len(objects), N_INPUTS)


def input_mask(l1_objects: np.ndarray) -> np.ndarray:
    """(N, 57) float32: 1 for the inputs of real objects (pT > 0), 0 for zero padding."""
    real = (np.asarray(l1_objects)[:, :, 0] > 0).astype(np.float32)
    return np.repeat(real, 3, axis=1)


def round_to_fixed(values: np.ndarray, fixed: FixedType) -> np.ndarray:
    """Round to the grid of ``fixed`` as its C++ conversion from float does.

    Supports the two modes a firmware input uses: convergent rounding (``AP_RND_CONV``,
    ties to even, as ``np.rint``) or truncation (``AP_TRN``, towards -inf), with
    saturation (``AP_SAT``). Returns float32; every value is exactly representable.

    Example:
        >>> t = FixedType.parse("ap_fixed<8,3,AP_RND_CONV,AP_SAT>")
        >>> round_to_fixed(np.array([0.015625, 0.046875, 9.0, -9.0]), t).tolist()
        [0.0, 0.0625, 3.96875, -4.0]
    """
    if fixed.saturation != "AP_SAT":
        msg = f"input type {fixed} must saturate (AP_SAT); wrapping inputs make no sense"
        raise ValueError(msg)
    steps = np.asarray(values, dtype=np.float64) / fixed.lsb
    if fixed.rounding == "AP_RND_CONV":
        steps = np.rint(steps)
    elif fixed.rounding == "AP_TRN":
        steps = np.floor(steps)
    else:
        msg = f"rounding mode {fixed.rounding} is not emulated; use AP_RND_CONV or AP_TRN"
        raise ValueError(msg)
    return np.clip(steps * fixed.lsb, fixed.min, fixed.max).astype(np.float32)


def read_l1_objects(
    paths: str | Path | Sequence[str | Path], *, max_events: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``l1_objects`` (and ``process_id``) from trigfarm event caches.

    Events with a non-finite L1 object are left out. ``max_events`` 0 reads everything.

    Returns:
        (objects (N, 19, 3) float32, process_id (N,) int16; -1 where the file has none)

    Raises:
        simulator.errors.DataFileError: a file that is not a readable cache.
        ValueError: the files hold no usable event.
    """
    from simulator.cache import read_cache

    if isinstance(paths, str | Path):
        paths = [paths]
    objects, process = [], []
    total = 0
    for batch in read_cache(list(paths), columns=("l1_objects",)):
        x = batch["l1_objects"]
        pid = batch.truth.get("process_id", np.full(len(x), -1, "<i2"))
        finite = np.isfinite(x).all(axis=(1, 2))
        objects.append(x[finite])
        process.append(np.asarray(pid)[finite])
        total += int(finite.sum())
        if max_events and total >= max_events:
            break
    if total == 0:
        msg = f"no usable L1 events in {[str(p) for p in paths]}"
        raise ValueError(msg)
    out = np.concatenate(objects)
    pids = np.concatenate(process)
    if max_events:
        out, pids = out[:max_events], pids[:max_events]
    return out, pids
