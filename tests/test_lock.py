"""The pinned environment: Prefect's own dependencies in the lock satisfy what Prefect declares, and the
server-side packages stay on the release series Prefect 3.7.7 was tested with (SQLAlchemy 2.1 silently
stops the scheduler; docs/dependencies.md). Fast: reads files and installed metadata only."""

from __future__ import annotations

import re
from importlib.metadata import requires
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
# package -> the release series Prefect 3.7.7's own uv.lock ran its tests with
TESTED_SERIES = {"sqlalchemy": "2.0", "cyclopts": "4.20", "pydocket": "0.22"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, Version]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            req = Requirement(line)
            pins[_norm(req.name)] = Version(next(iter(req.specifier)).version)
    return pins


def test_lock_satisfies_prefects_declared_requirements() -> None:
    pins = _pins(REPO / "requirements" / "cpu.lock.txt")
    bad = []
    for raw in requires("prefect") or []:
        req = Requirement(raw)
        if req.marker is not None and not req.marker.evaluate({"extra": "", "python_version": "3.11"}):
            continue
        version = pins.get(_norm(req.name))
        assert version is not None, f"{req.name} (a dependency of prefect) is not in cpu.lock.txt"
        if not req.specifier.contains(version, prereleases=True):
            bad.append(f"{req.name}=={version} outside prefect's {req.specifier}")
    assert not bad, bad


def test_prefect_server_packages_stay_on_the_series_prefect_was_tested_with() -> None:
    for path in (REPO / "requirements" / "cpu.lock.txt", REPO / "requirements" / "gpu.txt"):
        pins = _pins(path)
        assert pins["prefect"] == Version("3.7.7"), path
        for name, series in TESTED_SERIES.items():
            assert name in pins, f"{path.name} must pin {name} (prefect's range admits untested series)"
            got = f"{pins[name].major}.{pins[name].minor}"
            assert got == series, f"{path.name}: {name}=={pins[name]}, prefect 3.7.7 was tested on {series}.x"
