"""`--json` always answers: every command that takes --json prints exactly one JSON object on stdout, also
when it fails (`ok`, `error`, `exit_code`, `command`, and what it finished before the failure), while
the `error:` line still goes to stderr and the exit code is unchanged."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from bridgerec.cli import app
from tests.conftest import REPO, SAMPLE


def _bad_config(tmp: Path) -> Path:
    path = tmp / "bad.yaml"
    path.write_text("train:\n  epochs: -1\n")
    return path


# command -> (argv on a failing input under tmp, a word of the expected error)
FAILING: dict[str, Callable[[Path], tuple[list[str], str]]] = {
    "ingest": lambda t: (
        [
            "ingest",
            "--source",
            "generic",
            "--items",
            str(t / "no-items.csv"),
            "--interactions",
            str(t / "no-interactions.csv"),
            "-w",
            str(t / "ws"),
        ],
        "no-items.csv",
    ),
    "enrich": lambda t: (["enrich", "-w", str(t / "empty")], "ingest"),
    "train": lambda t: (["train", "-w", str(t / "empty")], "ingest"),
    "publish": lambda t: (["publish", "-w", str(t / "empty"), "--warehouse", str(t / "w.duckdb")], "train"),
    "run": lambda t: (["run", "--config", str(_bad_config(t))], "epochs"),
    "report": lambda t: (["report", "-w", str(t / "empty")], "night"),
    "recs": lambda t: (["recs", "--user", "u1", "--warehouse", str(t / "none.duckdb")], "none.duckdb"),
    "sql": lambda t: (["sql", "--warehouse", str(t / "none.duckdb"), "-q", "SELECT 1"], "none.duckdb"),
    "runs list": lambda t: (["runs", "list", "--warehouse", str(t / "none.duckdb")], "none.duckdb"),
    "models prepare": lambda t: (["models", "prepare", "--config", str(_bad_config(t))], "epochs"),
    "config show": lambda t: (["config", "show", "--config", str(_bad_config(t))], "epochs"),
    "warehouse relink": lambda t: (
        ["warehouse", "relink", "--warehouse", str(t / "none.duckdb")],
        "none.duckdb",
    ),
    "deploy-check": lambda t: (["deploy-check", "nowhere"], "'home' or 'config'"),
}


def _one_object(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


@pytest.mark.parametrize("command", sorted(FAILING))
def test_every_json_command_answers_its_failure_with_one_object(
    command: str, prefect_harness: None, tmp_path: Path
) -> None:
    (tmp_path / "empty").mkdir()
    argv, word = FAILING[command](tmp_path)
    out = CliRunner().invoke(app, [*argv, "--json"])
    assert out.exit_code == 2, out.output
    assert out.stderr.startswith("error: ") and word in out.stderr
    answer = _one_object(out.stdout)
    assert answer["ok"] is False and answer["exit_code"] == out.exit_code == 2
    assert answer["command"] == command
    assert answer["error"] == out.stderr.removeprefix("error: ").strip()
    # Without --json: the same error line and code, nothing on stdout.
    plain = CliRunner().invoke(app, argv)
    assert (plain.exit_code, plain.stderr, plain.stdout) == (2, out.stderr, "")


@pytest.mark.parametrize(
    ("command", "word"), [("enrich", "ingest"), ("train", "ingest"), ("publish", "train")]
)
def test_a_stage_on_a_mistyped_workspace_fails_at_once_and_makes_no_folder(
    command: str, word: str, tmp_path: Path
) -> None:
    """A stage whose earlier stage has not run there (here: -w names no folder at all) fails on its input
    check before Prefect starts and before its console session would make WORKSPACE/logs/ (a real
    process, whose real descriptors get a log file): a typo leaves nothing behind, and the one line
    names the missing stage."""
    ws = tmp_path / "typo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    done = subprocess.run(
        [sys.executable, "-m", "bridgerec.cli", command, "-w", str(ws)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and word in done.stderr and str(ws) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # no Prefect server was started
    assert not ws.exists()


@pytest.mark.parametrize(
    ("items", "inter", "said"),
    [
        (
            "item_id,domain,name\nb1,books,Dune\n",
            "user_id,item_id,domain,timestamp\nu1,b1,books,1600000000\n",
            "items.csv: missing required column(s) ['title']; found ['item_id', 'domain', 'name']",
        ),
        (
            "item_id,domain,title\nb1,books,Dune\n",
            "user_id,item_id,domain,when\nu1,b1,books,1600000000\n",
            "interactions.csv: needs a 'timestamp' or a 'position' column; found ['domain', 'item_id', 'user_id', 'when']",
        ),
    ],
)
def test_ingest_names_a_missing_column_before_prefect_starts(
    items: str, inter: str, said: str, tmp_path: Path
) -> None:
    """A missing column is found in the files' headers before Prefect and the stage start (it took 15 to
    19 s to say so in a new user's trial), and the workspace is left unmade (its logs/ folder was)."""
    (tmp_path / "items.csv").write_text(items)
    (tmp_path / "interactions.csv").write_text(inter)
    ws = tmp_path / "ws"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    done = subprocess.run(
        [sys.executable, "-m", "bridgerec.cli", "ingest", "-w", str(ws), "--set", "ingest.items=items.csv",
         "--set", "ingest.interactions=interactions.csv"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {said}"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # no Prefect server was started
    assert not ws.exists()


def test_every_command_has_json_and_is_covered() -> None:
    """Every command takes --json (a script can drive any of them), and a new one must join FAILING."""
    import typer.main

    group = typer.main.get_command(app)

    def commands(cmd, path=()):  # type: ignore[no-untyped-def]
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                yield from commands(sub, (*path, name))
        else:
            assert any("--json" in p.opts for p in cmd.params), f"`{' '.join(path)}` has no --json"
            yield " ".join(path)

    assert set(commands(group)) == set(FAILING)


def test_a_successful_answer_says_ok(tmp_path: Path) -> None:
    import duckdb

    duckdb.connect(str(tmp_path / "w.duckdb")).close()
    out = CliRunner().invoke(
        app, ["sql", "--warehouse", str(tmp_path / "w.duckdb"), "-q", "SELECT 41 + 1 AS a", "--json"]
    )
    assert out.exit_code == 0, out.output
    answer = _one_object(out.stdout)
    assert (answer["ok"], answer["columns"], answer["rows"]) == (True, ["a"], [[42]])
    shown = CliRunner().invoke(app, ["config", "show", "--json"])  # (indented: one object, several lines)
    assert shown.exit_code == 0 and json.loads(shown.stdout)["ok"] is True
    # the warehouse it shows is the file the commands use (unset, it follows the workspace), not null
    shown = CliRunner().invoke(app, ["config", "show", "--json"], env={"BRIDGEREC_WORKSPACE": str(tmp_path)})
    assert json.loads(shown.stdout)["warehouse"] == str(tmp_path / "warehouse.duckdb")
    # `train` as the model is built: the preset's switches applied (it showed the fields' own defaults)
    assert json.loads(shown.stdout)["train"]["id_embeddings"] is True  # llm4cdsr-hybrid, the default
    shown = CliRunner().invoke(app, ["config", "show", "--json", "--set", "train.model=llm4cdsr-llmonly"])
    assert (json.loads(shown.stdout)["train"]["alpha"], json.loads(shown.stdout)["train"]["beta"]) == (0, 0)


def _slice(out: Path, n_users: int) -> tuple[Path, Path]:
    with gzip.open(SAMPLE / "interactions.csv.gz", "rt") as fh:
        header, *rows = fh.read().splitlines()
    users = sorted({r.split(",")[0] for r in rows})[:n_users]
    kept = [r for r in rows if r.split(",")[0] in set(users)]
    items = {r.split(",")[1] for r in kept}
    with gzip.open(SAMPLE / "items.csv.gz", "rt") as fh:
        item_header, *item_rows = fh.read().splitlines()
    paths = out / "items.csv.gz", out / "interactions.csv.gz"
    with gzip.open(paths[0], "wt") as fh:
        fh.write("\n".join([item_header, *[r for r in item_rows if r.split(",")[0] in items]]) + "\n")
    with gzip.open(paths[1], "wt") as fh:
        fh.write("\n".join([header, *kept]) + "\n")
    return paths


def test_a_failed_night_answers_with_what_it_finished(prefect_harness: None, tmp_path: Path) -> None:
    """Ingest completes, enrich fails on a missing embedding model: one object, `ok` false, the night's
    summary (its record, as a successful night prints it) with the completed ingest stage and the failed
    stage named."""
    items, interactions = _slice(tmp_path, 30)
    config = yaml.safe_load((REPO / "configs" / "sample.yaml").read_text())
    config |= {
        "workspace": str(tmp_path / "ws"),
        "ingest": {"source": "generic", "items": str(items), "interactions": str(interactions)},
        "enrich": {"model": str(tmp_path / "no-such-model")},
        "runtime": {"stage_retries": 0},
    }
    path = tmp_path / "night.yaml"
    path.write_text(yaml.safe_dump(config))
    out = CliRunner().invoke(app, ["run", "--config", str(path), "--json"])
    assert out.exit_code == 1, out.output  # a failed night (the model setting is no input file's fault)
    answer = _one_object(out.stdout)
    assert answer["ok"] is False and answer["exit_code"] == 1 and answer["command"] == "run"
    assert "no-such-model" in answer["error"] and out.stderr.startswith("error: nightly run failed")
    assert answer["status"] == "failed" and answer["failed_stage"] == "enrich"
    assert set(answer["seconds"]) >= {"ingest", "enrich"}  # the failed stage keeps the seconds it ran
    assert answer["stages"]["ingest"]["users"] > 0 and answer["stages"]["enrich"] is None
    # In Prefect the night and its stages are named by what and when (not `marble-kingfisher`), and the
    # night carries the deployment's tags, where it came from and its workspace.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        night = client.read_flow_run(answer["flow_run_id"])
        runs = client.read_flow_runs(limit=200)
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[night.id])), limit=200
        )
    assert re.fullmatch(r"night \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", night.name), night.name
    assert {"bridgerec", "nightly", "cli", f"workspace:{(tmp_path / 'ws').resolve()}"} <= set(night.tags)
    stages = {r.name.split()[0] for r in runs if r.parent_task_run_id is not None and r.start_time}
    assert {"ingest", "enrich"} <= stages, stages
    mine = [r for r in runs if r.parent_task_run_id in {t.id for t in tasks}]  # this night's stages
    assert {r.name.split()[0] for r in mine} >= {"ingest", "enrich"}
    assert all(f"workspace:{(tmp_path / 'ws').resolve()}" in r.tags for r in mine)  # tagged too
    # The data checks are a task run of the night, beside the stages' subflow runs, with its state.
    checks = [t for t in tasks if t.name.startswith("data-checks")]
    assert len(checks) == 1 and checks[0].state is not None and checks[0].state.is_completed(), tasks


def test_a_night_stopped_by_its_data_checks_is_an_input_fault(prefect_harness: None, tmp_path: Path) -> None:
    """Tonight's export has half of last night's interactions: the data checks stop the night before it
    enriches anything, with one `error:` line that says what to do and exit code 2 (fix the export), as
    a bad file does, not 1 (a failure of the code)."""
    from bridgerec.config import load_settings
    from bridgerec.storage.workspace import Workspace
    from bridgerec.tasks.quality import check_data, keep_data_snapshot

    big, small = tmp_path / "big", tmp_path / "small"
    big.mkdir(), small.mkdir()
    config = yaml.safe_load((REPO / "configs" / "sample.yaml").read_text())
    config |= {"workspace": str(tmp_path / "ws"), "runtime": {"stage_retries": 0}}
    for folder, users in ((big, 60), (small, 30)):
        items, interactions = _slice(folder, users)
        config["ingest"] = {"source": "generic", "items": str(items), "interactions": str(interactions)}
        (folder / "night.yaml").write_text(yaml.safe_dump(config))
    # Last night: the bigger export ingested and checked (what a completed night leaves for the next).
    assert CliRunner().invoke(app, ["ingest", "--config", str(big / "night.yaml")]).exit_code == 0
    settings = load_settings(big / "night.yaml")
    assert check_data(settings.checks, Workspace(settings.workspace)).passed
    keep_data_snapshot(Workspace(settings.workspace))
    out = CliRunner().invoke(app, ["run", "--config", str(small / "night.yaml"), "--json"])
    assert out.exit_code == 2, out.output
    answer = _one_object(out.stdout)
    assert answer["ok"] is False and answer["exit_code"] == 2 and answer["failed_stage"] == "checks"
    assert answer["stages"]["enrich"] is None  # stopped before the LLM's work
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: data check: food interactions ")
    assert "checks.max_drop); fix the export and rerun" in out.stderr


_HOLD_THE_WORKSPACE = """
import sys, time
from bridgerec.storage.workspace import Workspace
with Workspace(sys.argv[1]).writing("nightly"):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_a_second_run_on_a_busy_workspace_stops_at_once_naming_the_first(
    prefect_harness: None, tmp_path: Path
) -> None:
    """Cron overlapping two nights on one workspace: the second stops before it writes anything, with
    one `error:` line naming the process that holds the workspace (exit 2); once that process is gone,
    even killed by SIGKILL, the workspace is free (the OS drops the lock with its process). In one
    process the lock is re-entrant: a night's stages take it again."""
    import signal

    from bridgerec.storage.workspace import Workspace

    ws = tmp_path / "ws"
    items, interactions = _slice(tmp_path, 30)
    config = yaml.safe_load((REPO / "configs" / "sample.yaml").read_text())
    config |= {
        "workspace": str(ws),
        "ingest": {"source": "generic", "items": str(items), "interactions": str(interactions)},
    }
    path = tmp_path / "night.yaml"
    path.write_text(yaml.safe_dump(config))
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_THE_WORKSPACE, str(ws)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        for argv in (["run", "--config", str(path)], ["ingest", "--config", str(path)]):
            out = CliRunner().invoke(app, argv)
            assert out.exit_code == 2, out.output
            assert out.stderr.startswith(f"error: workspace {ws} is being written by pid {holder.pid} on ")
            assert "(nightly, since " in out.stderr and out.stderr.count("\n") == 1
        assert not (ws / "ingest").exists() and not (ws / "warehouse.duckdb").exists()  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with Workspace(ws).writing("test"), Workspace(ws).writing("test, again"):  # free, and re-entrant
        pass
    with Workspace(ws).writing("test"):  # held by this process: another cannot take it
        taken = subprocess.run(
            [sys.executable, "-c", _HOLD_THE_WORKSPACE.replace("600", "0"), str(ws)],
            capture_output=True,
            text=True,
        )
    assert taken.returncode == 1 and "WorkspaceBusy: workspace" in taken.stderr
    assert f"by pid {os.getpid()} " in taken.stderr and "(test, since " in taken.stderr


def test_a_usage_error_answers_too(tmp_path: Path) -> None:
    """Outside any command's own checks (a required option missing), `bridgerec` still answers --json."""
    done = subprocess.run(
        [sys.executable, "-m", "bridgerec.cli", "recs", "--json"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "--user" in done.stderr
    answer = _one_object(done.stdout)
    assert answer["ok"] is False and answer["exit_code"] == 2 and answer["command"] == "recs"
    assert answer["error"] == "the command line was not understood: Missing option '--user' / '-u'."
    # The answer says what click said: a mistyped option of a command, a command of a group.
    for argv, said, command in (
        (
            ["train", "--epoch", "3", "--json"],
            "No such option: --epoch (Possible options: --epochs)",
            "train",
        ),
        (["runs", "lst", "--json"], "No such command 'lst'. Did you mean 'list'?", "runs"),
        (["warehouse", "relink", "--bogus", "--json"], "No such option: --bogus", "warehouse relink"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "bridgerec.cli", *argv], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2 and said in done.stderr
        answer = _one_object(done.stdout)
        assert answer["error"] == f"the command line was not understood: {said}"
        assert answer["command"] == command  # the words that name a command, as far as they do
        # On the terminal: one `error:` line pointing at the command's --help (Typer drew a boxed panel
        # under a usage line).
        stop = "" if said.endswith("?") else "."
        assert done.stderr.splitlines() == [f"error: {said}{stop} See 'bridgerec {command} --help'."]


def _command_paths() -> list[list[str]]:
    import typer.main

    def walk(cmd, path):  # type: ignore[no-untyped-def]
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                yield from walk(sub, [*path, name])
        else:
            yield path

    return list(walk(typer.main.get_command(app), []))


def test_help_paragraphs_wrap_to_the_terminal_not_to_the_source() -> None:
    """On an 80-column terminal every command's description reads as wrapped paragraphs: no line of a
    paragraph but its last is cut short by a line break of the docstring's source (Typer 0.29 kept
    them: "the best epoch's path is" / "trained again ...") and no flag is labelled as taking a value
    (Typer 0.29 showed `--json <bool>`)."""
    for path in [[], *_command_paths()]:
        out = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
        assert out.exit_code == 0, out.output
        assert "<bool>" not in out.stdout and "--help" in out.stdout, (path, out.stdout)
        lines = out.stdout.splitlines()
        start = next(i for i, line in enumerate(lines) if "Usage:" in line) + 1
        end = next(i for i, line in enumerate(lines) if line.startswith("╭"))
        paragraph: list[str] = []
        for line in [*(x.strip() for x in lines[start:end]), ""]:
            if line:
                paragraph.append(line)
                continue
            short = [x for x in paragraph[:-1] if len(x) < 45]
            assert not short, (path, paragraph)
            paragraph = []


@pytest.mark.parametrize("argv", [["runs", "list"], ["recs", "--user", "u1"], ["sql", "-q", "SELECT 1"]])
def test_a_reader_without_a_config_says_the_config_is_what_is_missing(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Right after `bridgerec run --config FILE`, a reading command without the config looks in the default
    workspace: the line says to pass the config (it said "run `bridgerec publish` first")."""
    monkeypatch.chdir(tmp_path)
    for name in ("BRIDGEREC_CONFIG", "BRIDGEREC_WORKSPACE", "BRIDGEREC_WAREHOUSE"):
        monkeypatch.delenv(name, raising=False)
    out = CliRunner().invoke(app, argv)
    assert out.exit_code == 2, out.output
    assert "no config was given" in out.stderr and "--config FILE" in out.stderr
    assert not (tmp_path / "workspace").exists()


def test_a_run_without_sources_fails_before_recording_a_night(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bridgerec run` with no config (a new user's first try) names no input files: one `error:` line
    that says so and how to give them, exit 2, and no `./workspace` with a failed night in it (it made
    one); with a config that names no files, the line is the plain one; a first night whose files are
    missing (relative paths read from another folder) stops the same way."""
    monkeypatch.chdir(tmp_path)
    for name in ("BRIDGEREC_CONFIG", "BRIDGEREC_WORKSPACE", "BRIDGEREC_WAREHOUSE"):
        monkeypatch.delenv(name, raising=False)
    out = CliRunner().invoke(app, ["run"])
    assert out.exit_code == 2, out.output
    assert out.stderr.startswith("error: source 'generic' needs ingest.items and ingest.interactions")
    assert "--set ingest.items=FILE" in out.stderr and "no config was given" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "workspace").exists()
    config = tmp_path / "over.yaml"
    config.write_text("train: {epochs: 7}\n")
    named = CliRunner().invoke(app, ["run", "--config", str(config)])
    assert named.exit_code == 2 and "needs ingest.items" in named.stderr
    assert "no config was given" not in named.stderr and not (tmp_path / "workspace").exists()
    # The sample's config from another folder: its relative data paths name no file here, and its
    # relative workspace does not exist here yet, so nothing is made (it made workspace/sample/ here).
    elsewhere = CliRunner().invoke(app, ["run", "--config", str(REPO / "configs" / "sample.yaml")])
    assert elsewhere.exit_code == 2 and "file not found (ingest items" in elsewhere.stderr
    assert f"relative paths are read from the working directory, {tmp_path}" in elsewhere.stderr
    assert len(elsewhere.stderr.strip().splitlines()) == 1 and not (tmp_path / "workspace").exists()


def test_a_reader_elsewhere_than_the_run_names_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config names a relative workspace, read from the working directory: a reading command started
    from another folder names that folder and the way out (a new user's trial: "run `bridgerec publish`
    first" from /tmp, after a published run)."""
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(app, ["recs", "--config", str(REPO / "configs" / "sample.yaml"), "--user", "a1"])
    assert out.exit_code == 2, out.output
    assert f"does not exist in the working directory {tmp_path}" in out.stderr
    assert "--warehouse with an absolute path" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_a_stage_on_the_default_workspace_says_nothing_named_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config of one setting (`train: {epochs: 7}`) names no workspace: `bridgerec train` finds no
    inputs in the default one, and its line says that the default was used and why (it said only "run
    ingest/enrich first"); with the workspace named, the line is the plain one."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BRIDGEREC_CONFIG", raising=False)
    monkeypatch.delenv("BRIDGEREC_WORKSPACE", raising=False)
    config = tmp_path / "over.yaml"
    config.write_text("train: {epochs: 7}\n")
    out = CliRunner().invoke(app, ["train", "--config", str(config)])
    assert out.exit_code == 2, out.output
    assert "run ingest/enrich first" in out.stderr and "(workspace) is the default" in out.stderr
    assert "does not extend another" in out.stderr
    named = CliRunner().invoke(app, ["train", "--config", str(config), "-w", str(tmp_path / "ws")])
    assert named.exit_code == 2 and "run ingest/enrich first" in named.stderr
    assert "is the default" not in named.stderr


def test_sql_refuses_options_that_cannot_go_together(tmp_path: Path) -> None:
    """`bridgerec sql -q ... --python` ran the query and dropped --python without a word; `--json` without
    a query would have opened a shell that answers no JSON. Each is one line, exit 2, before any file is
    opened."""
    missing = str(tmp_path / "none.duckdb")
    both = CliRunner().invoke(app, ["sql", "--warehouse", missing, "-q", "SELECT 1", "--python"])
    assert both.exit_code == 2 and "give one of them" in both.stderr, both.output
    shell = CliRunner().invoke(app, ["sql", "--warehouse", missing, "--json"])
    assert shell.exit_code == 2 and "add --query SQL" in shell.stderr, shell.output
    assert json.loads(shell.stdout)["ok"] is False


def test_only_usage_errors_are_kept_for_the_answer() -> None:
    """Typer exports no UsageError (it vendors click): the program tells click's usage errors (exit 2)
    from its other exceptions (exit 1) by their exit code, through the public base class."""
    from typer.exceptions import TyperException

    from bridgerec.cli import _Program

    _Program.usage_error = None
    _Program._keep(TyperException("a file could not be opened"))  # a ClickException's exit code: 1
    assert _Program.usage_error is None
    _Program._keep(typer.BadParameter("'x' is not a number"))
    assert _Program.usage_error == "Invalid value: 'x' is not a number"
    _Program.usage_error = None


def test_force_with_a_mistyped_stage_says_which_it_meant() -> None:
    """`bridgerec run --force trian`: one line naming the stages and the likely one, exit 2, before any
    config is read or Prefect started."""
    out = CliRunner().invoke(app, ["run", "--force", "trian", "--force", "ingest"])
    assert out.exit_code == 2, out.output
    assert out.stderr == (
        "error: --force names no stage: trian (the stages: ingest, enrich, train, publish); did you mean train?\n"
    )


def test_a_deployed_first_night_with_missing_inputs_makes_nothing(tmp_path: Path) -> None:
    """The flow itself (what a deployment runs, without `bridgerec run`'s own early check) stops a first
    night whose input files are missing before its workspace, warehouse and night row are made (a new
    user's deployed night left a stray workspace with a failed night in the checkout)."""
    from bridgerec.tasks.ingest import SourceError
    from flows.nightly import nightly_flow

    ws = tmp_path / "ws"
    config = tmp_path / "night.yaml"
    config.write_text(
        f"workspace: {ws}\ningest:\n  items: {tmp_path}/items.csv\n  interactions: {tmp_path}/i.csv\n"
    )
    with pytest.raises(SourceError, match=r"items.csv: file not found \(ingest items\)"):
        nightly_flow.fn(str(config))
    assert not ws.exists()
