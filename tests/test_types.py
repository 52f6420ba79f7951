"""Types are checked: mypy on the package laid out as a wheel installs it, with pyproject's [tool.mypy]
(strict on the torch-side models, storage and the runtime layer; mypy's defaults, untyped bodies
included, elsewhere)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.layout import PYPROJECT, REPO, lay_out_package, source_of

pytestmark = pytest.mark.slow  # a minute or two: scheduled first (tests/conftest.py)

CACHE = REPO / ".mypy_cache"  # warm across local runs; CI starts cold (a minute or two on 2 cores)


def mypy(root: Path, *targets: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(PYPROJECT),
            "--cache-dir",
            str(CACHE),
            *(targets or ("-p", "bridgerec")),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=1500,
    )


@pytest.fixture(scope="module")
def laid_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lay_out_package(tmp_path_factory.mktemp("site"))


def test_the_package_type_checks(laid_out: Path) -> None:
    result = mypy(laid_out)
    assert result.returncode == 0, source_of(laid_out, result.stdout + result.stderr)
    assert "Success: no issues found" in result.stdout


def test_the_strict_layers_reject_an_untyped_function(laid_out: Path, tmp_path: Path) -> None:
    """The check can fail: an unannotated function in runtime/ (strict) is an error; the same in a stage
    (checked with the defaults) is not."""
    import shutil

    root = tmp_path / "site"
    shutil.copytree(laid_out, root)
    with open(root / "bridgerec" / "runtime" / "errors.py", "a") as fh:
        fh.write("\n\ndef untyped(x):\n    return x\n")
    with open(root / "bridgerec" / "tasks" / "ingest" / "text.py", "a") as fh:
        fh.write("\n\ndef untyped(x):\n    return x\n")
    result = mypy(root)
    out = source_of(root, result.stdout)
    assert result.returncode == 1, out
    assert "runtime/errors.py" in out and "Function is missing a type annotation" in out
    assert "tasks/ingest/text.py" not in out


def test_the_benchmarks_type_check() -> None:
    """bench/ is checked too (mypy's defaults), against the installed package: its figures come from it."""
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "bench").glob("*.py"))
    result = mypy(REPO, *scripts)
    assert result.returncode == 0, result.stdout + result.stderr
