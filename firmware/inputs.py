"""The 57 L1 inputs: scaling of the 19 x (pT, eta, phi) objects and rounding to firmware types.

The (19, 3) objects are flattened object by object: (pT, eta, phi) of MET, 4 e/gamma,
4 muons, 10 jets. An object with pT = 0 is padding; the loss ignores its three inputs.

Scaling is a fixed per-input affine map, input = (value - mean) / std, recorded in the
model card (``InputScaling``) and applied on the host before rounding to the firmware's
input ``ap_fixed`` type, so the firmware sees exactly the rounded, scaled values.

- ``FIXED_SCALING`` (mean 0; std 32 GeV for pT, 1 for eta and phi): pT / 32 GeV, eta and
  phi as they are. Models without recorded statistics use it.
- ``InputScaling.fit``: standardisation with the per-input mean and standard deviation of
  the training background (Govorkova et al. 2022), the std floored at ``min_std`` (in
  pT/32 GeV or eta/phi units). Without it the jets' raw eta and phi (spread ~2) dominate
  the inputs and the rare leptons (pT/32 ~ 0.3) barely move the latent space, so R_z
  ranked the lepton signals as more background-like than background (AUC 0.32-0.49).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pydantic
from pydantic import ConfigDict, Field

from firmware.config import FixedType
from stream.schema import N_L1_OBJECTS

PT_SCALE_GEV = 32.0
N_INPUTS = N_L1_OBJECTS * 3


_Finite = Annotated[float, Field(allow_inf_nan=False)]
_Scale = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_PerInput = Field(min_length=N_INPUTS, max_length=N_INPUTS)


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class InputScaling:
    """Per-input affine scaling: input_i = (value_i - mean[i]) / std[i], 57 of each.

    ``mean`` and ``std`` are in the objects' own units (GeV, eta, rad), in input order.
    """

    mean: Annotated[tuple[_Finite, ...], _PerInput]
    std: Annotated[tuple[_Scale, ...], _PerInput]
    method: str = "fixed"

    @classmethod
    def fit(cls, l1_objects: np.ndarray, *, min_std: float = 0.01) -> InputScaling:
        """Standardisation fitted on (N, 19, 3) background objects (padding included).

        ``min_std`` floors each std in fixed-scaling units (pT / 32 GeV, eta, phi), so an
        input that is (nearly) constant on background, such as the 4th muon slot, maps a
        real object far out rather than dividing by zero; the firmware input type
        saturates those values.
        """
        if min_std <= 0:
            msg = f"min_std must be > 0, got {min_std}"
            raise ValueError(msg)
        x = scale_l1_objects(l1_objects).astype(np.float64)
        unit = np.asarray(FIXED_SCALING.std)
        mean = x.mean(axis=0) * unit
        std = np.maximum(x.std(axis=0), min_std) * unit
        return cls(
            mean=tuple(mean),
            std=tuple(std),
            method=f"standardised on background, min_std {min_std:g}",
        )

    @classmethod
    def from_card(cls, entry: dict[str, Any] | None) -> InputScaling:
        """The scaling of a model card's ``input_scaling`` entry (fixed if it has no stats)."""
        if not entry or "mean" not in entry:
            return FIXED_SCALING
        return cls(mean=entry["mean"], std=entry["std"], method=entry.get("method", "fitted"))

    def apply(self, l1_objects: np.ndarray) -> np.ndarray:
        """(N, 19, 3) objects -> (N, 57) float32 inputs."""
        objects = np.asarray(l1_objects, dtype=np.float32)
        if objects.ndim != 3 or objects.shape[1:] != (N_L1_OBJECTS, 3):
            msg = f"l1_objects must have shape (N, {N_L1_OBJECTS}, 3), got {objects.shape}"
            raise ValueError(msg)
        flat = objects.reshape(len(objects), N_INPUTS)
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return ((flat - mean) / std).astype(np.float32)

    def to_card(self) -> dict[str, Any]:
        """The model card's ``input_scaling`` entry."""
        return {
            "order": "19 objects x (pT, eta, phi): MET, 4 e/gamma, 4 muons, 10 jets",
            "formula": "input_i = (value_i - mean_i) / std_i; pT in GeV, eta, phi in rad",
            "method": self.method,
            "mean": list(self.mean),
            "std": list(self.std),
            "mask": "inputs of objects with pT = 0 (padding) are left out of the loss",
        }


#: pT / 32 GeV (a 5-bit shift of the hardware pT word); eta and phi as they are.
FIXED_SCALING = InputScaling(
    mean=(0.0,) * N_INPUTS,
    std=(PT_SCALE_GEV, 1.0, 1.0) * N_L1_OBJECTS,
    method="fixed: pT / 32 GeV",
)


def scale_l1_objects(l1_objects: np.ndarray, scaling: InputScaling = FIXED_SCALING) -> np.ndarray:
    """(N, 19, 3) objects -> (N, 57) float32 network inputs under ``scaling`` (a model's
    ``L1Model.input_scaling``; by default pT / 32 GeV, eta and phi as they are)."""
    return scaling.apply(l1_objects)


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
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ``l1_objects`` (and the event weights) from trigfarm event caches.

    Events with a non-finite L1 object are left out. ``max_events`` 0 reads everything.

    Returns:
        (objects (N, 19, 3) float32, weights (N,) float64 of weighted crossings, or None
        when no file has weights (every event counts once))

    Raises:
        stream.errors.DataFileError: a file that is not a readable cache.
        ValueError: the files hold no usable event.
    """
    from stream.eventfile import read_cache

    if isinstance(paths, str | Path):
        paths = [paths]
    objects, weights = [], []
    weighted = False
    total = 0
    for batch in read_cache(list(paths), columns=("l1_objects",)):
        x = batch["l1_objects"]
        finite = np.isfinite(x).all(axis=(1, 2))
        w = batch.truth.get("weight")
        weighted |= w is not None
        objects.append(x[finite])
        w = np.ones(len(x)) if w is None else np.asarray(w, np.float64)
        weights.append(w[finite])
        total += int(finite.sum())
        if max_events and total >= max_events:
            break
    if total == 0:
        msg = f"no usable L1 events in {[str(p) for p in paths]}"
        raise ValueError(msg)
    keep = slice(max_events or None)
    return np.concatenate(objects)[keep], np.concatenate(weights)[keep] if weighted else None
