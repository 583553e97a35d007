"""The integer kernel against hls4ml's C++: real background, adversarial inputs, every mode.

References are real g++-compiled ap_fixed code: the batched bridge over the session's
hls4ml project, a copy of that project with narrow rounding/saturating types, and a small
program that converts values between ap_fixed types in every rounding and overflow mode.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from firmware import fixed_point
from firmware.convert import PROJECT
from firmware.emulate import HLS_DIR, Emulator, compile_bridge
from firmware.fixed_point import convert, fixed_type, load_network, quantize
from firmware.inputs import N_INPUTS, scale_l1_objects
from stream.schema import L1_SLOTS
from tests.conftest import shared_data

pytestmark = pytest.mark.slow  # compiles hls4ml's C++

N_REAL = 12_000


@pytest.fixture(scope="module")
def bridge(session_emulator: Emulator) -> Emulator:
    """The C++ reference: hls4ml's top function over the batch (bit-identical to predict())."""
    return Emulator(
        session_emulator.library,
        input_type=session_emulator.input_type,
        latent=session_emulator.latent,
        kernel="hls",
    )


def lhco_background_objects(n: int) -> np.ndarray:
    """(n, 19, 3) L1 objects from real LHCO R&D background: the two leading R=1.0 jets in
    the first jet slots and their pT imbalance as MET (TeV jets saturate the input type)."""
    import pandas as pd

    frames, total = [], 0
    for i in range(1, 11):
        frame = pd.read_hdf(shared_data("lhco-rnd-100k", f"scalars_bkg{i:02d}.h5"))
        frames.append(frame)
        total += len(frame)
        if total >= n:
            break
    df = pd.concat(frames).iloc[:n]
    objects = np.zeros((len(df), 19, 3), np.float32)
    jet = L1_SLOTS["jet"].start
    px = py = 0.0
    for k in (1, 2):
        pt, phi = df[f"pt_{k}"].to_numpy(), df[f"phi_{k}"].to_numpy()
        objects[:, jet + k - 1] = np.stack([pt, df[f"eta_{k}"].to_numpy(), phi], axis=1)
        px, py = px + pt * np.cos(phi), py + pt * np.sin(phi)
    objects[:, L1_SLOTS["met"].start, 0] = np.hypot(px, py)
    objects[:, L1_SLOTS["met"].start, 2] = np.arctan2(-py, -px)
    return objects


def test_integer_kernel_equals_bridge_on_real_background(
    session_emulator: Emulator, bridge: Emulator
) -> None:
    assert session_emulator.kernel == "integer"  # the default
    x = scale_l1_objects(lhco_background_objects(N_REAL))
    ours, reference = session_emulator.predict(x), bridge.predict(x)
    assert ours.shape == (N_REAL, 6)
    np.testing.assert_array_equal(ours, reference)
    assert np.unique(reference).size > 100
    assert (np.abs(x) > session_emulator.input_type.max).any()  # input saturation exercised


def test_integer_kernel_equals_bridge_on_adversarial_inputs(
    session_emulator: Emulator, bridge: Emulator
) -> None:
    fixed = session_emulator.input_type
    rng = np.random.default_rng(7)
    n = 4000
    # Anywhere in (and beyond) the input range: drives ReLU saturation and accumulator wrap.
    wide = rng.uniform(1.5 * fixed.min, 1.5 * fixed.max, (n, N_INPUTS))
    # Exact ties and edges of the input grid: +-lsb/2 multiples, +-max, +-(max + lsb/2).
    steps = rng.integers(-(2**15), 2**15, (n, N_INPUTS))
    ties = (steps + 0.5) * fixed.lsb
    edges = rng.choice(
        [fixed.max, fixed.min, fixed.max + fixed.lsb / 2, fixed.min - fixed.lsb / 2, 0.0, 1e30],
        (n, N_INPUTS),
    ) * rng.choice([1.0, -1.0], (n, N_INPUTS))
    sparse = np.where(rng.random((n, N_INPUTS)) < 0.1, wide, 0.0)
    x = np.concatenate([wide, ties, edges, sparse]).astype(np.float32)
    np.testing.assert_array_equal(session_emulator.predict(x), bridge.predict(x))
    assert session_emulator.predict(x[:0]).shape == (0, 6)
    with pytest.raises(ValueError, match="non-finite"):
        session_emulator.predict(np.full((1, N_INPUTS), np.nan, np.float32))


NARROW_TYPES = {
    # product rounding + saturating adds (the general, sequential dense path)
    "enc_dense2_accum_t": "ap_fixed<16,8,AP_RND,AP_SAT>",
    "layer5_t": "ap_fixed<14,6,AP_TRN_ZERO,AP_SAT>",
    "z_mean_accum_t": "ap_fixed<12,4,AP_RND_CONV,AP_SAT_SYM>",
    "layer8_t": "ap_fixed<10,3,AP_RND_ZERO,AP_SAT_ZERO>",
    "weight10_t": "ap_fixed<6,2,AP_RND_INF,AP_SAT>",
    "z_log_var_accum_t": "ap_fixed<14,4,AP_RND_MIN_INF,AP_WRAP>",
    "layer7_t": "ap_ufixed<6,2,AP_RND,AP_SAT>",
}


def test_narrow_rounding_and_saturating_types_match_their_cpp(
    session_emulator: Emulator, tmp_path: Path
) -> None:
    """The same project with narrow types in other modes, compiled by g++ and read by the
    integer kernel: still bit for bit (types are read from the project, not assumed)."""
    project = tmp_path / "narrow"
    shutil.copytree(session_emulator.library.parent / HLS_DIR, project)
    defines = project / "firmware" / "defines.h"
    text = defines.read_text()
    for name, new in NARROW_TYPES.items():
        old = next(line for line in text.splitlines() if line.endswith(f" {name};"))
        text = text.replace(old, f"typedef {new} {name};")
    defines.write_text(text)
    library = compile_bridge(project, PROJECT, tmp_path / "libnarrow.so")
    reference = Emulator(library, input_type=session_emulator.input_type, latent=3, kernel="hls")
    network = load_network(project, PROJECT)
    x = scale_l1_objects(lhco_background_objects(2000))
    rng = np.random.default_rng(3)
    x = np.concatenate([x, rng.uniform(-70, 70, (2000, N_INPUTS))]).astype(np.float32)
    expected = reference.predict(x)
    np.testing.assert_array_equal(network.predict(x), expected)
    assert np.unique(expected).size > 20


MODES = [(q, o) for q, o in itertools.product(fixed_point.ROUNDING, fixed_point.OVERFLOW)]
SOURCE = "ap_fixed<20,8>"
TARGETS = ["ap_fixed<9,4,{q},{o}>", "ap_ufixed<7,2,{q},{o}>", "ap_fixed<24,10,{q},{o}>"]


def test_every_rounding_and_overflow_mode_matches_ap_fixed(
    session_emulator: Emulator, tmp_path: Path
) -> None:
    """``convert`` and ``quantize`` against ap_types' own assignments, mode by mode."""
    if shutil.which("g++") is None:
        pytest.skip("g++ is not on PATH")
    rng = np.random.default_rng(5)
    source = fixed_type(SOURCE)
    edges = np.array([-8.0, 8.0, -4.0, 4.0, -2.0, 2.0])  # exactly the targets' limits
    raw = np.concatenate(
        [
            rng.integers(-(2**19), 2**19, 3000),
            np.arange(-300, 300),
            [-(2**19), 2**19 - 1],
            (edges / source.lsb).astype(np.int64),
        ]
    )
    floats = np.concatenate(
        [raw * source.lsb, rng.normal(0, 20, 1000), [1e12, -1e12, -512.0, 512.0, -1024.0]]
    )
    targets = [t.format(q=q, o=o) for q, o in MODES for t in TARGETS]
    body = "\n".join(
        f"  {{ typedef {t} T; for (int i = 0; i < n; ++i) {{ S s = grid[i]; T a = s;"
        f' std::printf("%.17g\\n", a.to_double()); }}'
        f" for (int i = 0; i < m; ++i) {{ T b = vals[i];"
        f' std::printf("%.17g\\n", b.to_double()); }} }}'
        for t in targets
    )
    program = tmp_path / "modes.cpp"
    program.write_text(
        '#include "ap_fixed.h"\n#include <cstdio>\n'
        f"typedef {SOURCE} S;\n"
        f"static const double grid[] = {{{', '.join(repr(float(v)) for v in raw * source.lsb)}}};\n"
        f"static const double vals[] = {{{', '.join(repr(float(v)) for v in floats)}}};\n"
        f"int main() {{\n  const int n = {len(raw)}, m = {len(floats)};\n{body}\n  return 0;\n}}\n"
    )
    ap_types = session_emulator.library.parent / HLS_DIR / "firmware" / "ap_types"
    binary = tmp_path / "modes"
    subprocess.run(
        ["g++", "-O0", "-std=c++11", f"-I{ap_types}", str(program), "-o", str(binary)], check=True
    )
    printed = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    expected = np.array(printed.split(), np.float64).reshape(len(targets), -1)
    for row, text in zip(expected, targets, strict=True):
        t = fixed_type(text)
        got = np.concatenate([convert(raw, fixed_point.frac_bits(source), t), quantize(floats, t)])
        np.testing.assert_array_equal(got * t.lsb, row, err_msg=text)
