"""The package's shape: one import name, imports pointing one way, stages seen only through their face.

The import graph is checked by import-linter (the contracts in pyproject.toml, `[tool.importlinter]`)
on the package laid out as a wheel installs it: the design card's top-level folders (flows/, tasks/,
models/, storage/) become subpackages of `bridgerec` through setuptools' package-dir mapping, which the
editable install of the checkout resolves with an import hook that grimp does not walk.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.layout import REPO, lay_out_package

PYPROJECT = REPO / "pyproject.toml"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(PYPROJECT), "--no-cache", "--no-logo"],
        cwd=root,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def laid_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lay_out_package(tmp_path_factory.mktemp("site"))


def test_the_package_keeps_every_import_contract(laid_out: Path) -> None:
    result = lint_imports(laid_out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 9 kept, 0 broken." in result.stdout


def test_an_upward_import_and_a_stage_internal_import_break_the_contracts(
    laid_out: Path, tmp_path: Path
) -> None:
    """The contracts can fail: storage importing a stage (upward), publish importing the train stage's
    internal module and the objectives importing a model (even for type checking only) are each
    reported by their contract."""
    root = tmp_path / "site"
    shutil.copytree(laid_out, root)
    with open(root / "bridgerec" / "storage" / "files.py", "a") as fh:
        fh.write("\nfrom bridgerec.tasks.publish import PublishSettings  # noqa\n")
    with open(root / "bridgerec" / "tasks" / "publish" / "recommend.py", "a") as fh:
        fh.write("\nfrom bridgerec.tasks.train.stage import run_train  # noqa\n")
    with open(root / "bridgerec" / "models" / "objectives.py", "a") as fh:  # the old import circle
        fh.write("\nif TYPE_CHECKING:\n    from bridgerec.models.base import Recommender  # noqa\n")
    result = lint_imports(root)
    assert result.returncode != 0
    out = " ".join(result.stdout.split())  # import-linter wraps long lines
    assert (
        "Imports point one way: cli -> flows -> stages -> config -> tasks -> models | storage -> runtime BROKEN"
        in out
    )
    assert "bridgerec.storage.files -> bridgerec.tasks.publish" in out
    assert "Outside the train stage, only its face (bridgerec.tasks.train) is imported BROKEN" in out
    assert "bridgerec.tasks.publish.recommend -> bridgerec.tasks.train.stage" in out
    assert "The training objectives and the batch know no model" in out and "BROKEN" in out
    assert "bridgerec.models.objectives -> bridgerec.models.base" in out


@pytest.mark.parametrize("name", ["models", "tasks", "storage", "flows"])
def test_no_generic_top_level_name_is_importable(name: str, tmp_path: Path) -> None:
    """Only `bridgerec` is installed: the old generic names fail outside the checkout."""
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is not None)"
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path).returncode == 0
    found = subprocess.run(
        [sys.executable, "-c", f"import bridgerec.{name}"], cwd=tmp_path, capture_output=True, text=True
    )
    assert found.returncode == 0, found.stderr


def test_reading_the_settings_imports_no_engine() -> None:
    """Every command reads the settings (`bridgerec --help` too): through the stages' lazy faces that
    imports none of torch, vLLM, faiss or matplotlib (with them --help took 4 s instead of 0.75 s); the faces
    still hand out every name they list, and faiss arrives with the first index built."""
    code = (
        "import sys, bridgerec.cli, bridgerec.config\n"
        # A package counts as imported once its submodules are (a lazy module stands in sys.modules alone).
        "def loaded(name): return any(m.startswith(name + '.') for m in sys.modules)\n"
        "heavy = sorted(m for m in ('torch', 'vllm', 'faiss', 'matplotlib') if loaded(m))\n"
        "assert not heavy, heavy\n"
        "import numpy as np\n"
        "from bridgerec.storage.index_store import IndexSettings, build_index\n"
        "assert build_index(np.eye(4, dtype=np.float32), IndexSettings()).ntotal == 4 and loaded('faiss')\n"
        "import bridgerec.tasks.train as face\n"
        "assert callable(face.run_train) and 'torch' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("stage", ["ingest", "enrich", "train", "publish", "quality", "report"])
def test_every_name_a_stage_face_lists_resolves(stage: str) -> None:
    import importlib

    face = importlib.import_module(f"bridgerec.tasks.{stage}")
    assert face.__all__ and all(getattr(face, name) is not None for name in face.__all__)
