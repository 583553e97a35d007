"""Board packages: the hls4ml VivadoAccelerator project, test vectors, driver and README.

``write_board_project`` writes, for one board:

    DIR/hls4ml_prj/                hls4ml VivadoAccelerator project (HLS + block design)
    DIR/hls4ml_prj/tb_data/        tb_input_features.dat (rounded inputs) and
                                   tb_output_predictions.dat (the emulator's outputs)
    DIR/driver/trigfarm_l1_driver.py   on-board check: runs tb_data through the bitstream
    DIR/README.md                  exact vendor commands for synthesis, bitstream, board run
    DIR/deploy.json                what was written, with the model digest

Without vendor tools, ``csim`` is the C-simulation check: the project's own testbench is
compiled with g++, run on tb_data, and its outputs must equal the emulator's exactly.
``build`` runs the vendor flow and stops with ``MissingToolError`` when a tool is absent.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from firmware.convert import BOARDS, PROJECT, convert, quantizer_serialisation_warnings_ignored
from firmware.emulate import Emulator
from firmware.model import L1Model

HLS_PROJECT = "hls4ml_prj"
TB_INPUT = "tb_input_features.dat"
TB_OUTPUT = "tb_output_predictions.dat"
CSIM_LOG = "csim_results.log"
DRIVER = "trigfarm_l1_driver.py"


class MissingToolError(RuntimeError):
    """A vendor tool the requested step needs is not on PATH."""

    def __init__(self, tool: str, step: str) -> None:
        self.tool = tool
        super().__init__(
            f"{tool!r} is not on PATH; it is needed to {step}. Install the AMD/Xilinx tools "
            f"(Vivado/Vitis HLS 2020.1 or later) and source their settings64.sh, or run the "
            f"commands in the project README on a machine that has them."
        )


@dataclass(frozen=True, slots=True)
class BoardProject:
    """Where ``write_board_project`` put things."""

    root: Path
    board: str
    hls_dir: Path
    tb_inputs: Path
    tb_outputs: Path
    driver: Path
    readme: Path


def _write_matrix(path: Path, values: np.ndarray) -> None:
    # %.9g round-trips float32 exactly.
    lines = (" ".join(f"{v:.9g}" for v in row) for row in np.asarray(values, np.float32))
    path.write_text("\n".join(lines) + "\n")


def read_matrix(path: str | Path) -> np.ndarray:
    """Read a whitespace-separated tb_data or csim log file as float32 rows."""
    rows = [line.split() for line in Path(path).read_text().splitlines() if line.strip()]
    return np.array(rows, dtype=np.float64).astype(np.float32)


def write_board_project(
    model: L1Model, board: str, out_dir: str | Path, inputs: np.ndarray, emulator: Emulator
) -> BoardProject:
    """Write the board project for ``board`` with test vectors from (N, 57) ``inputs``."""
    if board not in BOARDS:
        msg = f"unknown board {board!r}; choose one of {BOARDS}"
        raise ValueError(msg)
    root = Path(out_dir)
    hls_dir = root / HLS_PROJECT
    if hls_dir.exists():
        shutil.rmtree(hls_dir)
    root.mkdir(parents=True, exist_ok=True)
    with _board_file_leak_ignored():
        hls_model = convert(model, hls_dir, board=board)
        with quantizer_serialisation_warnings_ignored():
            hls_model.write()
    _print_full_precision(hls_dir / f"{PROJECT}_test.cpp")
    rounded = emulator.round_inputs(inputs)
    expected = emulator.predict(rounded)
    tb = hls_dir / "tb_data"
    tb.mkdir(exist_ok=True)
    _write_matrix(tb / TB_INPUT, rounded)
    _write_matrix(tb / TB_OUTPUT, expected)
    driver_dir = root / "driver"
    driver_dir.mkdir(exist_ok=True)
    shutil.copy(tb / TB_INPUT, driver_dir / TB_INPUT)
    shutil.copy(tb / TB_OUTPUT, driver_dir / TB_OUTPUT)
    shutil.copy(hls_dir / "axi_stream_driver.py", driver_dir / "axi_stream_driver.py")
    driver = driver_dir / DRIVER
    driver.write_text(_DRIVER.format(n_in=rounded.shape[1], n_out=expected.shape[1]))
    (hls_dir / "check_csim.py").write_text(_CHECK_CSIM.format(n_out=expected.shape[1]))
    readme = root / "README.md"
    readme.write_text(_readme(board, model, len(rounded)))
    (root / "deploy.json").write_text(
        json.dumps(
            {
                "board": board,
                "model": str(model.path),
                "model_digest": model.digest(),
                "project": PROJECT,
                "io_type": "io_parallel",
                "interface": "axi_stream",
                "n_test_vectors": len(rounded),
                "quantization": model.card["quantization"],
            },
            indent=2,
        )
        + "\n"
    )
    return BoardProject(root, board, hls_dir, tb / TB_INPUT, tb / TB_OUTPUT, driver, readme)


@contextmanager
def _board_file_leak_ignored() -> Iterator[None]:
    """hls4ml's VivadoAccelerator config reads ``supported_boards.json`` with an unclosed
    ``open()`` each time it is built (a ResourceWarning); nothing of ours leaks."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="unclosed file.*supported_boards", category=ResourceWarning
        )
        yield


def _print_full_precision(testbench: Path) -> None:
    """Make the testbench log 9 significant digits, so csim outputs compare exactly."""
    text = testbench.read_text()
    anchor = "std::ofstream fout(RESULTS_LOG);"
    if anchor not in text:
        msg = f"{testbench} has no {anchor!r}; hls4ml's testbench template changed"
        raise RuntimeError(msg)
    testbench.write_text(text.replace(anchor, anchor + "\n    fout.precision(9);", 1))


def csim(hls_dir: str | Path, *, timeout_s: float = 600.0) -> np.ndarray:
    """Compile the project's C++ testbench with g++, run it on tb_data; returns its outputs.

    Raises:
        MissingToolError: no g++.
        RuntimeError: compilation or the run failed (with the compiler's message).
    """
    hls_dir = Path(hls_dir).resolve()
    if shutil.which("g++") is None:
        raise MissingToolError("g++", "compile the C-simulation testbench")
    sources = [f"{PROJECT}_test.cpp", f"firmware/{PROJECT}.cpp", f"firmware/{PROJECT}_axi.cpp"]
    command = [
        "g++",
        "-O2",
        "-std=c++11",
        "-I.",
        "-Ifirmware",
        "-Ifirmware/ap_types",
        '-DWEIGHTS_DIR="firmware/weights"',
        *[s for s in sources if (hls_dir / s).exists()],
        "-o",
        "csim.out",
    ]
    done = subprocess.run(
        command, cwd=hls_dir, capture_output=True, text=True, check=False, timeout=timeout_s
    )
    if done.returncode != 0:
        msg = f"g++ failed on the testbench:\n{done.stderr[-4000:]}"
        raise RuntimeError(msg)
    run = subprocess.run(
        ["./csim.out"], cwd=hls_dir, capture_output=True, text=True, check=False, timeout=timeout_s
    )
    if run.returncode != 0:
        msg = f"the C-simulation testbench failed:\n{run.stdout[-2000:]}{run.stderr[-2000:]}"
        raise RuntimeError(msg)
    n_out = read_matrix(hls_dir / "tb_data" / TB_OUTPUT).shape[1]
    return read_csim_log(hls_dir / "tb_data" / CSIM_LOG, n_out)


def read_csim_log(path: str | Path, n_outputs: int) -> np.ndarray:
    """The outputs in a testbench log; the AXI testbench prints ``{ data: x, last: b }``."""
    text = Path(path).read_text()
    if "data:" in text:
        values = [float(v) for v in re.findall(r"data:\s*([^,\s}]+)", text)]
    else:
        values = [float(v) for v in text.split()]
    return np.array(values, np.float64).astype(np.float32).reshape(-1, n_outputs)


def vendor_commands(board: str) -> list[tuple[str, str]]:
    """(description, shell command) pairs of the vendor flow, run in the hls4ml project."""
    steps = [
        (
            "HLS: C simulation, synthesis and IP export (Vivado HLS; with Vitis HLS use "
            "`vitis_hls -f build_prj.tcl` and the same arguments)",
            'vivado_hls -f build_prj.tcl "reset=1 csim=1 synth=1 cosim=0 validation=0 '
            'export=1 vsynth=0"',
        ),
    ]
    if board.startswith("alveo"):
        steps += [
            ("Vivado: package the RTL kernel (.xo)", "vivado -mode batch -source design.tcl"),
            (
                "Vitis: link the kernel into an xclbin for the U50 platform",
                "mkdir -p xclbin_files && cd xclbin_files && v++ -t hw --platform "
                "xilinx_u50_gen3x16_xdma_201920_3 --link ../xo_files/l1vae_kernel.xo "
                "-o l1vae_kernel.xclbin --user_ip_repo_paths ../l1vae_prj/solution1/impl/ip",
            ),
        ]
    else:
        steps.append(
            (
                "Vivado: block design, implementation and bitstream",
                "vivado -mode batch -source design.tcl",
            )
        )
    return steps


def build(project: BoardProject) -> None:
    """Run the vendor flow for ``project`` (hours of tool time).

    Raises:
        MissingToolError: vivado_hls/vitis_hls, vivado (or v++ for Alveo) not on PATH.
        RuntimeError: a step failed (names the command).
    """
    hls_tool = shutil.which("vivado_hls") or shutil.which("vitis_hls")
    if shutil.which("vivado") is None:
        raise MissingToolError("vivado", f"build the {project.board} bitstream")
    if hls_tool is None:
        raise MissingToolError("vivado_hls", "synthesise the HLS IP")
    if project.board.startswith("alveo") and shutil.which("v++") is None:
        raise MissingToolError("v++", "link the Alveo xclbin")
    for description, command in vendor_commands(project.board):
        if command.startswith("vivado_hls") and Path(hls_tool).name == "vitis_hls":
            command = command.replace("vivado_hls", "vitis_hls", 1)
        done = subprocess.run(command, shell=True, cwd=project.hls_dir, check=False)
        if done.returncode != 0:
            msg = f"{description} failed (exit {done.returncode}): {command}"
            raise RuntimeError(msg)


def _readme(board: str, model: L1Model, n_vectors: int) -> str:
    commands = "\n".join(
        f"{i}. {description}:\n\n   ```\n   cd {HLS_PROJECT}\n   {command}\n   ```\n"
        for i, (description, command) in enumerate(vendor_commands(board), start=1)
    )
    if board.startswith("alveo"):
        run = (
            "Copy `hls4ml_prj/xclbin_files/l1vae_kernel.xclbin` and `driver/` to the host "
            "with the U50 and the XRT runtime plus PYNQ (`pip install pynq`), then:\n\n"
            "```\ncd driver\npython trigfarm_l1_driver.py ../hls4ml_prj/xclbin_files/"
            "l1vae_kernel.xclbin\n```\n"
        )
    else:
        run = (
            "Copy `hls4ml_prj/l1vae_vivado_accelerator/project_1.runs/impl_1/design_1_wrapper.bit`"
            " and the matching `.hwh` (from `project_1.gen/sources_1/bd/design_1/hw_handoff/`,"
            " or `.srcs/` on older Vivado) into `driver/` as `l1vae.bit`/`l1vae.hwh`, copy "
            "`driver/` to the board (PYNQ image), then on the board:\n\n"
            "```\ncd driver\nsudo python3 trigfarm_l1_driver.py l1vae.bit\n```\n"
        )
    return f"""# L1 VAE encoder firmware for {board}

Model: `{model.path}` (digest `{model.digest()[:16]}`). The encoder (57 inputs ->
concat(mu, log sigma^2), latent {model.vae.latent}) is an hls4ml VivadoAccelerator project
(io_parallel, AXI-stream, float at the DMA boundary). The precision of every layer is in
`deploy.json` and `hls4ml_prj/hls4ml_config.yml`.

## Check without vendor tools (C simulation with g++)

`tb_data/` holds {n_vectors} events rounded to the input type and the outputs of trigfarm's
bit-accurate emulator. `trigfarm firmware deploy` already compiled the project's testbench
with g++ and required identical outputs. By hand:

```
cd {HLS_PROJECT}
g++ -O2 -std=c++11 -I. -Ifirmware -Ifirmware/ap_types -DWEIGHTS_DIR='"firmware/weights"' \\
    {PROJECT}_test.cpp firmware/{PROJECT}.cpp firmware/{PROJECT}_axi.cpp -o csim.out
./csim.out && python3 check_csim.py
```

## Synthesis and bitstream (AMD/Xilinx tools on PATH)

`trigfarm firmware deploy --board {board} --out DIR --build` runs these steps; by hand:

{commands}
## Run on the board

{run}
The driver streams `{TB_INPUT}` through the firmware and checks the outputs against
`{TB_OUTPUT}` (exact equality expected), then prints the inference rate.
"""


_DRIVER = '''"""On-board check of the trigfarm L1 encoder: tb_data through the bitstream (PYNQ).

Usage: python trigfarm_l1_driver.py BITSTREAM [--inputs tb_input_features.dat]
Exit status 0 when every output equals the emulator's expected output.
"""

import argparse
import sys

import numpy as np
from axi_stream_driver import NeuralNetworkOverlay

N_IN, N_OUT = {n_in}, {n_out}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("bitstream")
    parser.add_argument("--inputs", default="tb_input_features.dat")
    parser.add_argument("--expected", default="tb_output_predictions.dat")
    args = parser.parse_args()
    x = np.loadtxt(args.inputs, dtype=np.float32, ndmin=2)
    expected = np.loadtxt(args.expected, dtype=np.float32, ndmin=2)
    overlay = NeuralNetworkOverlay(args.bitstream, x.shape, (len(x), N_OUT))
    y, seconds, rate = overlay.predict(x, profile=True)
    y = np.asarray(y, dtype=np.float32)
    mismatched = int((y != expected).any(axis=1).sum())
    print(f"{{len(x)}} events, {{mismatched}} mismatched, {{rate:.0f}} inferences/s")
    return 0 if mismatched == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
'''


_CHECK_CSIM = '''"""Compare tb_data/csim_results.log with the emulator's expected outputs."""

import re
import sys

import numpy as np

log = open("tb_data/csim_results.log").read()
got = np.array([float(v) for v in re.findall(r"data:\\s*([^,\\s}}]+)", log)], np.float32)
expected = np.loadtxt("tb_data/tb_output_predictions.dat", dtype=np.float32, ndmin=2)
got = got.reshape(-1, {n_out})
bad = int((got != expected).any(axis=1).sum())
print(f"{{len(got)}} events, {{bad}} differ from the emulator")
sys.exit(1 if bad else 0)
'''
