"""The install `make` performs: Prefect importable (no `dataclasses` backport shadowing the stdlib), lint clean."""

import dataclasses
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dataclasses_is_the_standard_library():
    assert Path(dataclasses.__file__).parent == Path(sysconfig.get_paths()["stdlib"]), dataclasses.__file__


def test_prefect_pydantic_img2dataset_and_torch_import_together():
    code = (
        "import img2dataset, prefect, pydantic, torch, mlflow, prefect_dask;"
        "from dataclasses import dataclass; dataclass(slots=True)(type('X', (), {}));"
        "assert torch.__version__.startswith('2.13.0'), torch.__version__"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_console_script_is_installed():
    dalle = Path(sys.executable).parent / "dalle"
    assert dalle.exists() or shutil.which("dalle")
    out = subprocess.run(
        [str(dalle), "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    for command in ("ingest", "verify", "synth", "serve-images", "demo"):
        assert command in out


def test_ruff_is_clean():
    ruff = Path(sys.executable).parent / "ruff"
    result = subprocess.run([str(ruff), "check", str(ROOT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
