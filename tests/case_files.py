"""The real-world input cases under tests/cases (copied from ../shared/cases, each with its README)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CASES = Path(__file__).resolve().parent / "cases"


def copy_case(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A writable copy of tests/cases/<name> under `tmp_path`, made the working directory (the cases'
    commands and configs use paths relative to it). Returns the copy's path."""
    here = tmp_path / name
    shutil.copytree(CASES / name, here)
    monkeypatch.chdir(here)
    return here
