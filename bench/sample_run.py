"""Benchmark: the README's main command on the bundled sample, for two commits side by side.

Is the sample run slower than it was? Timings taken on different days do not answer that on a shared
VM (the same code ran the sample in 3 min 37 s one afternoon and 6 min 2 s two days later), so this
script runs `bridgerec run --config configs/sample.yaml` for a base commit and a head commit in turns
(base, head, base, head, ...), each time in a fresh workspace, and compares them within the sitting.

Each commit is checked out with `git worktree add` into a temporary folder and imported from there:
the package is laid out as `[tool.setuptools.package-dir]` in that commit's pyproject.toml says (the
`bridgerec/` folder with `flows/`, `tasks/`, `models/` and `storage/` linked under it) and put first on
the child's `PYTHONPATH`; the child runs with `python -P` so the checkout's own `bridgerec/` folder is
not imported instead. Both commits run with this checkout's virtual environment (its pinned packages):
what differs is the project's code and its configs/sample.yaml. Committed code only: the working tree
is not measured. `BRIDGEREC_*` variables of the calling shell are removed from the children's
environment, so both run the defaults.

Per run: the wall time of the command, each stage's seconds (the night's record,
WORKSPACE/nights/<id>.json) and what it did (texts embedded, profiles and tokens generated, epochs, the
validation and test full-ranking NDCG@10). The table gives each commit's median over the rounds and
head / base.

Usage: .venv/bin/python bench/sample_run.py [--base 242d743] [--head HEAD] [--rounds 2]
       [--out bench/results/sample_run.json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from bridgerec.runtime.machine import machine_info

REPO = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "checks", "enrich", "train", "gate", "publish")
# The commit the issue #28 work started from (main on 2026-12-03, before its first change landed).
DEFAULT_BASE = "242d743"
PROBE = "import bridgerec, bridgerec.tasks, bridgerec.cli; print(bridgerec.tasks.__file__)"
MAIN = "from bridgerec.cli import main; main()"


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def stage_commit(ref: str, root: Path) -> tuple[str, Path, Path]:
    """Check `ref` out under `root/src` and lay its package out under `root/pkg` as an install would.
    Returns (full commit hash, the checkout, the folder to put on PYTHONPATH)."""
    commit = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    src, pkg = root / "src", root / "pkg"
    git("worktree", "add", "--detach", "--force", str(src), commit)
    layout = tomllib.loads((src / "pyproject.toml").read_text())["tool"]["setuptools"].get("package-dir", {})
    # bridgerec/ as a folder of links to the checkout's entries, plus the sub-packages the layout maps
    # elsewhere (bridgerec.flows = "flows", ...).
    (pkg / "bridgerec").mkdir(parents=True)
    for entry in (src / "bridgerec").iterdir():
        (pkg / "bridgerec" / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    for name, folder in layout.items():
        parent, _, child = name.partition(".")
        if parent != "bridgerec" or not child or "." in child:
            raise SystemExit(
                f"error: {src / 'pyproject.toml'}: package-dir entry {name!r} is not bridgerec.<name>"
            )
        (pkg / "bridgerec" / child).symlink_to(src / folder, target_is_directory=True)
    return commit, src, pkg


def child_env(pkg: Path, workspace: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGEREC_")}
    env["PYTHONPATH"] = str(pkg)
    if workspace is not None:
        env["BRIDGEREC_WORKSPACE"] = str(workspace)
    return env


def check_imports(src: Path, pkg: Path) -> None:
    """The child must import the staged commit, not this checkout's editable install."""
    out = subprocess.run(
        [sys.executable, "-P", "-c", PROBE], cwd=src, env=child_env(pkg, None), capture_output=True, text=True
    )
    where = Path(out.stdout.strip() or "/nonexistent").resolve()
    if out.returncode != 0 or not where.is_relative_to(src.resolve()):
        sys.stderr.write(out.stderr[-2000:])
        raise SystemExit(f"error: the child imported bridgerec.tasks from {where}, not from {src}")


def run_once(src: Path, pkg: Path, workspace: Path, log: Path) -> dict[str, Any]:
    """One `bridgerec run --config configs/sample.yaml` in a fresh workspace; its figures."""
    argv = [sys.executable, "-P", "-c", MAIN, "run", "--config", "configs/sample.yaml"]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(
            argv, cwd=src, env=child_env(pkg, workspace), stdout=fh, stderr=subprocess.STDOUT
        )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(log.read_text()[-3000:])
        raise SystemExit(f"error: the sample run failed (exit {proc.returncode}); its log: {log}")
    nights = sorted((workspace / "nights").glob("*.json"))
    night = json.loads(nights[-1].read_text())
    stages = night["stages"]
    enrich, train = stages.get("enrich") or {}, stages.get("train") or {}
    test = train.get("test") or {}
    return {
        "wall_s": round(wall, 1),
        "load_average_at_start": round(load, 2),
        "seconds": {s: night["seconds"].get(s) for s in STAGES},
        "texts_embedded": enrich.get("texts_embedded"),
        "embedding_texts_per_s": enrich.get("embedding_texts_per_s"),
        "profiles_generated": enrich.get("profiles_generated"),
        "tokens_generated": enrich.get("tokens_generated"),
        "epochs": train.get("epochs"),
        "best_epoch": train.get("best_epoch"),
        "valid_full_ndcg@10": night.get("best_valid_ndcg10"),
        "test_full_ndcg@10": ((test.get("full") or {}).get("overall") or {}).get("ndcg@10"),
        "run_id": train.get("run_id"),
    }


def median(runs: list[dict[str, Any]], key: str, stage: str | None = None) -> float | None:
    values = [(r["seconds"][stage] if stage else r[key]) for r in runs]
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--base", default=DEFAULT_BASE, help=f"The commit to compare against (default {DEFAULT_BASE})."
    )
    ap.add_argument("--head", default="HEAD", help="The commit measured (default HEAD; committed code only).")
    ap.add_argument("--rounds", type=int, default=2, help="Runs of each commit, in turns (default 2).")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sample_run.json")
    ap.add_argument("--keep", type=Path, help="Keep the checkouts, workspaces and logs in this folder.")
    args = ap.parse_args()
    if args.rounds < 1:
        raise SystemExit("error: --rounds must be at least 1")

    root = Path(args.keep or tempfile.mkdtemp(prefix="bench-sample-run-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    labels = {"base": args.base, "head": args.head}
    staged: dict[str, tuple[str, Path, Path]] = {}
    runs: dict[str, list[dict[str, Any]]] = {"base": [], "head": []}
    machine = machine_info()
    try:
        for label, ref in labels.items():
            staged[label] = stage_commit(ref, root / label)
            check_imports(*staged[label][1:])
        for n in range(1, args.rounds + 1):
            for label in ("base", "head"):
                commit, src, pkg = staged[label]
                result = run_once(src, pkg, root / label / f"ws-{n}", root / label / f"run-{n}.log")
                runs[label].append(result)
                print(
                    f"round {n} {label} {commit[:10]}: {result['wall_s']:.1f} s "
                    f"(load {result['load_average_at_start']}) {result['seconds']}",
                    flush=True,
                )
    finally:
        for label in staged:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(root / label / "src")]
            )
        if args.keep is None:
            subprocess.run(["rm", "-rf", str(root)])

    rows = [("wall", None)] + [(s, s) for s in STAGES]
    table = {name: {label: median(runs[label], "wall_s", stage) for label in runs} for name, stage in rows}
    out = {
        "what": "bridgerec run --config configs/sample.yaml, fresh workspace per run, commits in turns",
        "base": {"ref": args.base, "commit": staged["base"][0]},
        "head": {"ref": args.head, "commit": staged["head"][0]},
        "rounds": args.rounds,
        "machine": machine,
        "machine_at_end": machine_info(),
        "runs": runs,
        "median_seconds": table,
        "head_over_base_wall": round(
            statistics.median(r["wall_s"] for r in runs["head"])
            / statistics.median(r["wall_s"] for r in runs["base"]),
            3,
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")

    print(
        f"\n{'median seconds':<16}{'base ' + staged['base'][0][:7]:>16}{'head ' + staged['head'][0][:7]:>16}{'head / base':>13}"
    )
    for name, values in table.items():
        b, h = values["base"], values["head"]
        ratio = f"{h / b:.2f}" if b and h is not None else ""
        shown = [f"{v:.1f}" if v is not None else "" for v in (b, h)]
        print(f"{name:<16}{shown[0]:>16}{shown[1]:>16}{ratio:>13}")
    for label in ("base", "head"):
        last = runs[label][-1]
        print(
            f"{label}: {last['texts_embedded']} texts embedded, {last['profiles_generated']} profiles "
            f"({last['tokens_generated']} tokens), best epoch {last['best_epoch']}/{last['epochs']}, "
            f"valid full NDCG@10 {last['valid_full_ndcg@10']}, test {last['test_full_ndcg@10']}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
