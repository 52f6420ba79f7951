"""What the food-kitchen benchmarks share: where the dataset is, and running a measured child process.

The whole food-kitchen dataset (53,061 users, 36,298 items, 436k interactions: `items.csv.gz` and
`interactions.csv.gz`) does not ship with the repository (the bundled sample is too small to measure);
the benchmarks read the team's copy beside the checkout, `../shared/data/food-kitchen`, or the folder
given with `--data DIR`. A missing folder or file stops a benchmark with one `error:` line and exit 2.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOOD_KITCHEN = REPO.parent / "shared" / "data" / "food-kitchen"
FILES = ("items.csv.gz", "interactions.csv.gz")


def add_data_argument(ap: argparse.ArgumentParser) -> None:
    """`--data DIR`, the food-kitchen folder (default: `../shared/data/food-kitchen`)."""
    ap.add_argument(
        "--data",
        type=Path,
        default=FOOD_KITCHEN,
        help=f"The food-kitchen dataset's folder ({', '.join(FILES)}; default: {FOOD_KITCHEN}).",
    )


def food_kitchen(data: Path) -> Path:
    """`data`, resolved, once it holds both files; else one `error:` line on stderr and exit 2."""
    missing = [name for name in FILES if not (data / name).is_file()]
    if missing:
        print(
            f"error: {data}: no {' or '.join(missing)}; the benchmarks need the food-kitchen dataset "
            "(../shared/data/food-kitchen beside the checkout, or --data DIR)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return data.resolve()


def run_child(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """Run a benchmark's child process (its own process, so its threads and memory are its own) and
    return its stdout; where it fails, its stderr's end is shown and the benchmark exits with its code."""
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        print(
            f"error: a benchmark child process failed (exit {proc.returncode}); the end of its stderr is above",
            file=sys.stderr,
        )
        raise SystemExit(proc.returncode)
    return proc.stdout
