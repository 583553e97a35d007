"""``simulator`` loads its heavy dependencies only for the names that need them."""

from __future__ import annotations

import subprocess
import sys

import simulator

HEAVY = ("pythia8mc", "fastjet", "uproot", "pandas", "tables")


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_light_modules_load_no_generator() -> None:
    done = run(
        "import sys, simulator, simulator.replay, stream.eventfile, simulator.lhco_features\n"
        "simulator.PROCESSES, simulator.DataFileError, simulator.read_lhco_features\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_generator_names_load_pythia_on_first_use() -> None:
    done = run(
        "import sys, simulator\n"
        "assert 'pythia8mc' not in sys.modules\n"
        "simulator.generate\n"
        "print('pythia8mc' in sys.modules, 'fastjet' in sys.modules)"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True True"


def test_missing_package_gives_an_install_hint() -> None:
    done = run(
        "import sys\n"
        "sys.modules['pythia8mc'] = None  # as if it were not installed\n"
        "import simulator\n"
        "try:\n"
        "    simulator.EventGenerator\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    assert done.returncode == 0, done.stderr
    assert "pip install" in done.stdout and "pythia8mc" in done.stdout


def test_every_public_name_resolves() -> None:
    assert set(simulator.__all__) == set(simulator._EXPORTS)
    for name in simulator.__all__:
        assert getattr(simulator, name) is not None
