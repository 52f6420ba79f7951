"""The package laid out as a wheel installs it, for the checks that read it as installed (import-linter,
mypy): the design card's top-level folders (flows/, tasks/, models/, storage/) become subpackages of
`bridgerec` through setuptools' package-dir mapping, which the editable install resolves with an import
hook that neither tool walks."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"


def lay_out_package(dest: Path) -> Path:
    """Copy the package's modules into `dest` as an installed wheel lays them out (per pyproject's
    `packages` and `package-dir`); returns `dest`."""
    tool = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]
    mapping: dict[str, str] = tool.get("package-dir", {})
    for package in tool["packages"]:
        # a package's folder: its own mapping, else its parent's folder + its last name, else its dotted path
        parts = package.split(".")
        source = None
        for cut in range(len(parts), 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in mapping:
                source = REPO / mapping[prefix] / Path(*parts[cut:])
                break
        source = source or REPO / Path(*parts)
        target = dest / Path(*parts)
        target.mkdir(parents=True, exist_ok=True)
        for module in [*source.glob("*.py"), *source.glob("*.pyi")]:  # .pyi: the lazy faces' stubs
            shutil.copy2(module, target / module.name)
    return dest


def source_of(laid_out: Path, text: str) -> str:
    """`text` (a tool's report) with each laid-out module path replaced by its path in the checkout."""
    tool = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]
    mapping: dict[str, str] = tool.get("package-dir", {})
    for package, folder in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(str(laid_out / Path(*package.split("."))) + "/", folder + "/")
        text = text.replace(str(Path(*package.split("."))) + "/", folder + "/")
    return text.replace(str(laid_out) + "/", "")
