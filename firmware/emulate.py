"""The bit-accurate firmware emulator: hls4ml's C++ of the encoder, and an exact integer kernel.

hls4ml's ``predict()`` calls its C++ once per event from Python. Here a small C++ entry
point (``batch_bridge.cpp``) loops over a contiguous batch; it is compiled with g++
against the project hls4ml wrote and called through ctypes, and gives the same bits as
``predict()`` (the same conversion and top function per event). That is the ``"hls"``
kernel, the reference.

Most of its time is software ``ap_fixed`` arithmetic, so the default ``"integer"`` kernel
(``firmware.fixed_point``) replays the same network on int64 values vectorised over the
batch, with every type and weight read from the same hls4ml project; it is tested bit for
bit against the ``"hls"`` kernel and hls4ml's ``predict()``.

The compiled library is cached under ``cache_dir/<key>/`` where the key hashes the
weights, the quantization and architecture, the hls4ml version and the bridge source.
A cache hit needs only numpy and ctypes; a miss converts the model (TensorFlow + hls4ml,
tens of seconds) once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from firmware.config import FixedType
from firmware.fixed_point import IntegerNetwork, load_network
from firmware.inputs import N_INPUTS, round_to_fixed
from firmware.model import L1Model

log = logging.getLogger(__name__)

BRIDGE_SOURCE = Path(__file__).resolve().parent / "batch_bridge.cpp"
LIBRARY_NAME = "libtrigfarm_l1.so"
HLS_DIR = "hls"
#: ``"integer"``: exact int64 numpy kernel (fast, default); ``"hls"``: hls4ml's C++ via the bridge.
KERNELS = ("integer", "hls")


def default_cache_dir() -> Path:
    """``~/.cache/trigfarm/l1-emulator``: where compiled emulators live by default."""
    return Path.home() / ".cache" / "trigfarm" / "l1-emulator"


class Emulator:
    """The compiled encoder firmware: (N, 57) inputs -> (N, 2 x latent) = (mu, log sigma^2).

    Inputs are rounded to the firmware input type first (the C++ conversion would do the
    same), so callers and references see exactly what the firmware sees. ``kernel`` picks
    the exact integer kernel (reads the hls4ml project in ``library``'s ``hls/`` sibling)
    or the C++ bridge; ``threads`` OpenMP threads share a batch of the bridge. Inputs must
    be finite (the integer kernel raises ``ValueError`` otherwise).
    """

    def __init__(
        self,
        library: str | Path,
        *,
        input_type: FixedType,
        latent: int,
        threads: int = 1,
        kernel: str = "integer",
    ) -> None:
        if threads < 1:
            msg = f"threads must be >= 1, got {threads}"
            raise ValueError(msg)
        if kernel not in KERNELS:
            msg = f"unknown emulator kernel {kernel!r}; choose one of {KERNELS}"
            raise ValueError(msg)
        self.threads = threads
        self.kernel = kernel
        self.library = Path(library)
        self.input_type = input_type
        self.latent = latent
        self._lib = ctypes.CDLL(str(self.library))
        self.n_inputs = int(self._lib.trigfarm_n_inputs())
        self.n_outputs = int(self._lib.trigfarm_n_outputs())
        if self.n_inputs != N_INPUTS or self.n_outputs != 2 * latent:
            msg = (
                f"{self.library} has {self.n_inputs} inputs and {self.n_outputs} outputs; "
                f"expected {N_INPUTS} and {2 * latent}"
            )
            raise ValueError(msg)
        fn = self._lib.trigfarm_predict_batch
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
        fn.restype = ctypes.c_long
        self._predict = fn
        self._network: IntegerNetwork | None = None
        if kernel == "integer":
            from firmware.convert import PROJECT

            network = load_network(self.library.parent / HLS_DIR, PROJECT)
            if (network.n_inputs, network.n_outputs) != (self.n_inputs, self.n_outputs):
                msg = f"the hls4ml project beside {self.library} does not match the library"
                raise ValueError(msg)
            self._network = network

    def round_inputs(self, inputs: np.ndarray) -> np.ndarray:
        """Round (N, 57) inputs to the firmware input type (float32, C-contiguous)."""
        return np.ascontiguousarray(round_to_fixed(inputs, self.input_type))

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """(N, 57) inputs -> (N, 2 x latent) float32 firmware outputs."""
        x = np.asarray(inputs, np.float32).reshape(-1, self.n_inputs)
        if self._network is not None:
            return self._network.predict(x)
        x = self.round_inputs(x)
        out = np.empty((len(x), self.n_outputs), np.float32)
        if len(x):
            self._predict(x.ctypes.data, out.ctypes.data, len(x), self.threads)
        return out

    def encode(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mu, log sigma^2), each (N, latent)."""
        out = self.predict(inputs)
        return out[:, : self.latent], out[:, self.latent :]


@dataclass(frozen=True, slots=True)
class TopFunction:
    """Name and port types of the hls4ml top function, read from its header."""

    name: str
    input_type: str
    n_inputs: int
    output_type: str
    n_outputs: int


def top_function(project_dir: str | Path, project: str) -> TopFunction:
    """Parse ``firmware/<project>.h`` for the top function's single input and output."""
    header = (Path(project_dir) / "firmware" / f"{project}.h").read_text()
    port = r"(\w+)\s+\w+\[(\d+)\]"
    pattern = rf"void\s+{re.escape(project)}\s*\(\s*{port}\s*,\s*{port}\s*\)"
    match = re.search(pattern, header)
    if match is None:
        msg = f"cannot find a one-input, one-output top function {project}() in the header"
        raise RuntimeError(msg)
    in_t, n_in, out_t, n_out = match.groups()
    return TopFunction(project, in_t, int(n_in), out_t, int(n_out))


def compile_bridge(project_dir: str | Path, project: str, library: str | Path) -> Path:
    """Compile the batched bridge against an hls4ml project (g++ only); returns the library."""
    project_dir = Path(project_dir).resolve()
    top = top_function(project_dir, project)
    source = BRIDGE_SOURCE.read_text()
    for key, value in {
        "@PROJECT@": top.name,
        "@IN_T@": top.input_type,
        "@N_IN@": str(top.n_inputs),
        "@OUT_T@": top.output_type,
        "@N_OUT@": str(top.n_outputs),
    }.items():
        source = source.replace(key, value)
    bridge = project_dir / "trigfarm_batch_bridge.cpp"
    bridge.write_text(source)
    library = Path(library).resolve()
    weights_dir = f'"{project_dir / "firmware" / "weights"}"'
    command = [
        "g++",
        "-O3",
        "-fPIC",
        "-std=c++11",
        "-shared",
        "-fopenmp",
        f"-I{project_dir}",
        f"-I{project_dir / 'firmware'}",
        f"-I{project_dir / 'firmware' / 'ap_types'}",
        f"-DWEIGHTS_DIR={weights_dir}",
        str(project_dir / "firmware" / f"{project}.cpp"),
        str(bridge),
        "-o",
        str(library),
    ]
    if shutil.which("g++") is None:
        raise RuntimeError("g++ is not on PATH: it is needed to compile the L1 emulator")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        msg = f"g++ failed to compile the batched bridge:\n{done.stderr[-4000:]}"
        raise RuntimeError(msg)
    return library


def cache_key(model: L1Model) -> str:
    """Hash of everything the compiled emulator depends on (model, conversion, bridge, build)."""
    h = hashlib.sha256()
    h.update(model.digest().encode())
    h.update(BRIDGE_SOURCE.read_bytes())
    h.update(Path(__file__).with_name("convert.py").read_bytes())
    h.update(Path(__file__).read_bytes())  # the g++ command
    h.update(metadata.version("hls4ml").encode())
    return h.hexdigest()[:20]


def build_project(model: L1Model, project_dir: str | Path, *, compile_library: bool = True) -> Any:
    """Convert the encoder and write the hls4ml project; returns hls4ml's model.

    With ``compile_library`` hls4ml also builds its own library (g++), which its per-event
    ``predict()`` needs; the batched bridge needs only the written project.
    Imports TensorFlow, QKeras and hls4ml.
    """
    from firmware.convert import convert, quantizer_serialisation_warnings_ignored

    hls_model = convert(model, project_dir)
    with quantizer_serialisation_warnings_ignored():
        if compile_library:
            hls_model.compile()
        else:
            hls_model.write()
    return hls_model


def load_emulator(
    model: L1Model,
    *,
    cache_dir: str | Path | None = None,
    threads: int = 1,
    kernel: str = "integer",
) -> Emulator:
    """The emulator of ``model``, compiled once and cached by ``cache_key``; ``kernel`` and
    ``threads`` as in ``Emulator``."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = root / cache_key(model)
    library = entry / LIBRARY_NAME
    if not library.is_file():
        root.mkdir(parents=True, exist_ok=True)
        log.info("compiling the L1 emulator into %s (one-time, needs TensorFlow + hls4ml)", entry)
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            build_project(model, staging / HLS_DIR, compile_library=False)
            from firmware.convert import PROJECT

            compile_bridge(staging / HLS_DIR, PROJECT, staging / LIBRARY_NAME)
            try:
                os.replace(staging, entry)
            except OSError:
                # Another process finished the same entry first; theirs is as good.
                if not library.is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return Emulator(
        library,
        input_type=model.quantization.input_fixed,
        latent=model.vae.latent,
        threads=threads,
        kernel=kernel,
    )
