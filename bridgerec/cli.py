"""The `bridgerec` command line. Each stage has a sub-command; `run` runs them all."""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, cast

import typer
import yaml
from pydantic import BaseModel
from typer.core import TyperGroup
from typer.exceptions import TyperException

import bridgerec.runtime.prefect_env  # noqa: F401  (must precede any prefect import)
from bridgerec.config import CONFIG_ENV, ENV_PREFIX, ConfigError, Settings, load_settings
from bridgerec.runtime import console, progress
from bridgerec.runtime.errors import EXIT_FAILURE, EXIT_HELD, EXIT_INPUT, InputError, input_error_in
from bridgerec.runtime.logs import hide_input_error_tracebacks
from bridgerec.runtime.prefect_api import (
    PrefectUnreachable,
    check_api,
    detach_temporary_server,
    unreachable_in,
)
from bridgerec.runtime.signals import handlers_restored, ignore_stop_signals, stop_on_signals, stop_signal
from bridgerec.runtime.terminal import printable, shown

if TYPE_CHECKING:
    # The vendored click class TyperGroup's methods take (Typer 0.26+ vendors click and exports neither
    # it nor UsageError; typing only, so nothing at run time rests on the private module).
    from typer._click.core import Context as ClickContext

    from bridgerec.flows.night import NightSummary
    from bridgerec.flows.nightly import Stage
    from bridgerec.tasks.enrich import EnrichSummary
    from bridgerec.tasks.ingest import IngestSummary
    from bridgerec.tasks.publish import PublishSummary
    from bridgerec.tasks.train import TrainSummary


class _Program(TyperGroup):
    """The program's command group: keeps the message of a command-line error (an unknown command or
    option, a missing or bad value; click prints it on stderr) for the `--json` answer `main` gives."""

    usage_error: str | None = None
    USAGE_EXIT = 2  # click's UsageError family (unknown command or option, missing or bad value), public
    # here only through its base TyperException: the others (ClickException, FileError) exit with 1

    def make_context(self, *args: Any, **kwargs: Any) -> ClickContext:
        try:
            return super().make_context(*args, **kwargs)
        except TyperException as exc:  # an option of the program itself
            _Program._say(exc)

    def get_help_option(self, ctx: ClickContext) -> Any:
        option = super().get_help_option(ctx)  # `bridgerec --help`'s own (the commands': `_unlabel_flags`)
        if option is not None:
            option.metavar = ""
        return option

    def resolve_command(self, ctx: ClickContext, args: list[str]) -> tuple[str | None, Any, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        _unlabel_flags(command, ctx)
        return name, command, rest

    def invoke(self, ctx: ClickContext) -> Any:
        try:
            return super().invoke(ctx)
        except TyperException as exc:  # a command's (its name, options, values), at any depth
            _Program._say(exc)

    @staticmethod
    def _keep(exc: TyperException) -> None:
        """Keep the message of a usage error for `main`'s `--json` answer."""
        if exc.exit_code == _Program.USAGE_EXIT:
            _Program.usage_error = exc.format_message()

    @staticmethod
    def _say(exc: TyperException) -> NoReturn:
        """One `error:` line for a command line click could not use (exit 2) or a file it could not open
        (exit 1), pointing at the `--help` of the command it was for, instead of Typer's boxed panel
        under a usage line; then exit with click's code (`main` adds the `--json` answer)."""
        _Program._keep(exc)
        message = exc.format_message().strip()
        if message and message[-1] not in ".?!":
            message += "."
        ctx = getattr(exc, "ctx", None)  # a usage error's: the command it was for
        if ctx is not None:
            message += f" See '{ctx.command_path} --help'."
        typer.secho(f"error: {printable(message)}", fg=typer.colors.RED, err=True, file=console.err())
        raise SystemExit(exc.exit_code)


def _unlabel_flags(command: Any, ctx: ClickContext) -> None:
    """No type label after a flag in `--help` (Typer 0.29 shows `--json <bool>`, `--help <bool>`, as if
    they took a value): the flags of `command` and of every command under it, its help option too."""
    for sub in getattr(command, "commands", {}).values():
        _unlabel_flags(sub, ctx)
    for param in [*getattr(command, "params", []), command.get_help_option(ctx) if command else None]:
        if getattr(param, "is_flag", False):
            param.metavar = ""


app = typer.Typer(
    cls=_Program,
    name="bridgerec",
    help=(
        "Cross-domain next-item recommendations bridged by LLMs (LLM4CDSR), as a nightly batch pipeline.\n\n"
        "Stages: ingest -> enrich -> train -> publish; `run` does all of them. Settings come from a YAML "
        "file (--config or $BRIDGEREC_CONFIG) and BRIDGEREC_* env vars (nested keys joined by '__')."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect the effective configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
models_app = typer.Typer(help="Prepare the LLMs for offline use.", no_args_is_help=True)
app.add_typer(models_app, name="models")
runs_app = typer.Typer(help="Published runs in the warehouse.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
warehouse_app = typer.Typer(help="Look after the warehouse file.", no_args_is_help=True)
app.add_typer(warehouse_app, name="warehouse")


@app.callback()
def _invocation() -> None:
    # Runs before every command (its options are parsed after): no answer is owed until a --json
    # option's callback says so (several invocations share a process in tests and embedders).
    _Answer.current = None


ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file (default: $BRIDGEREC_CONFIG).", show_default=False),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="One setting for this command only, over the config file and env vars: --set train.epochs=3 "
        "(dotted YAML keys; the value is YAML: 3, 0.5, true, \\[a, b]; repeat for several).",
        show_default=False,
    ),
]
WorkspaceOpt = Annotated[
    Path | None,
    typer.Option(
        "--workspace", "-w", help="Workspace folder (overrides config `workspace`).", show_default=False
    ),
]


class _Answer:
    """What a command owes a script that asked for `--json`: exactly one JSON object on stdout, whatever
    happens. A success answers with its result (`_emit`, plus `"ok": true`); a failure, expected
    (`_fail`) or not (`main`), with `{"ok": false, "error", "exit_code", "command"}` plus what the command
    finished before it failed (`done`, e.g. the night's summary with its completed stages) and the log
    file. The `--json` option's callback arms it, once per invocation."""

    current: _Answer | None = None  # this invocation's (reset by `_invocation` before each command)

    def __init__(self, command: str, as_json: bool) -> None:
        self.command, self.as_json = command, as_json
        self.done: dict[str, Any] = {}
        self.answered = False

    def write(self, data: dict[str, Any]) -> None:
        if self.answered:
            return
        self.answered = True
        log = console.log_path()
        if log is not None:
            data["log_file"] = str(log)
        console.out().write(json.dumps(data, default=str) + "\n")
        console.out().flush()

    def failure(self, message: str, code: int) -> None:
        if self.as_json:
            self.write(
                {"ok": False, "error": message, "exit_code": code, "command": self.command} | self.done
            )


def _json_mode(ctx: typer.Context, value: bool) -> bool:
    """The `--json` option's callback (called for every command that has the option, given or not):
    this invocation's `_Answer`."""
    names: list[str] = []
    c: Any = ctx
    while c.parent is not None:  # the command's names below the program's (`runs list`)
        names.append(c.info_name or "")
        c = c.parent
    _Answer.current = _Answer(" ".join(reversed(names)), value)
    return value


def _answer() -> _Answer | None:
    return _Answer.current


def _json_opt(help: str) -> Any:
    return typer.Option("--json", help=help, callback=_json_mode)


PIPED_WIDTH = 1000  # columns of a result written to a pipe or a file: wide enough for any table here

JsonOpt = Annotated[bool, _json_opt("Print one JSON object on stdout (no progress bars), also on failure.")]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        envvar=console.VERBOSE_ENV,
        help="Show everything on the terminal: Prefect's log, third-party warnings (vLLM, torch), no log "
        "file. By default they go to WORKSPACE/logs/<time>-<command>.log and the terminal shows "
        "bridgerec's own lines, bars and the result.",
    ),
]


def print_markdown(text: str) -> None:
    """`text` (Markdown) on the command's stdout: rendered on a terminal (rich: the table drawn, bold, links
    that open), as written when stdout is a pipe or a file (a log, a wiki page, `| grep`)."""
    out = console.out()
    if not (hasattr(out, "isatty") and out.isatty()):
        typer.echo(text, file=out)
        return
    from rich.console import Console
    from rich.markdown import Markdown
    from rich.theme import Theme

    theme = Theme({"markdown.code": "bold cyan"})  # rich's default adds a black background
    Console(file=out, theme=theme).print(Markdown(text, hyperlinks=True))


def print_night_summary(summary: NightSummary) -> None:
    """The night's summary (`summary_markdown`) on stdout as `print_markdown` prints it, but the report's
    path as plain text: as a Markdown link, a terminal showed the link's whole source and a narrow one
    broke it over three lines, which could be neither copied nor clicked (a new user's trial). On a
    terminal the path is one line that rich does not wrap (the terminal folds it where it must, and copies
    it whole) and a hyperlink to the page."""
    from bridgerec.flows.night import summary_markdown, summary_sections

    out = console.out()
    if not summary.report:
        print_markdown(summary_markdown(summary))
        return
    head, tail = summary_sections(summary)
    if not (hasattr(out, "isatty") and out.isatty()):
        typer.echo(f"{head}\n- night report: {summary.report}\n\n{tail}", file=out)
        return
    from rich.console import Console
    from rich.style import Style
    from rich.text import Text

    print_markdown(head)
    line = Text.assemble((" • ", "bold"), "night report: ")  # as rich draws the bullets above it
    line.append(printable(summary.report), Style(link=Path(summary.report).as_uri()))
    Console(file=out).print(line, soft_wrap=True, no_wrap=True, overflow="ignore", crop=False)
    typer.echo("", file=out)
    print_markdown(tail)


def _fail(message: str, code: int = EXIT_INPUT) -> NoReturn:
    """One `error:` line on the terminal's stderr (control characters from the data shown as escapes),
    under `--json` also the failure's JSON object on stdout (`_Answer`), then exit with `code`; a failure
    that is not the user's points at the log file's details. Every failure a command expects ends here."""
    log = console.log_path()
    if code != EXIT_INPUT and log is not None:
        message += f" (details in {log})"
    typer.secho(f"error: {printable(message)}", fg=typer.colors.RED, err=True, file=console.err())
    if (answer := _answer()) is not None:
        answer.failure(message, code)  # --json: the failure as the command's one JSON object
    raise typer.Exit(code)


@contextlib.contextmanager
def _console(settings: Settings, command: str, as_json: bool, verbose: bool) -> Iterator[None]:
    """The command's console session (runtime/console.py): third-party output to the workspace's log
    file unless --verbose; the file's path is printed once."""
    with console.session(
        settings.workspace,
        command,
        verbose=verbose,
        as_json=as_json,
        keep_logs=settings.runtime.keep_logs,
        log_level=settings.runtime.log_level,
    ) as path:
        if path is not None and not as_json:
            console.echo(f"log: {path} (third-party messages and details; --verbose shows them here)", "dim")
        yield


def _count(n: int, noun: str) -> str:
    """`1 shard`, `2 shards`: a count with its noun in the right number."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _rich() -> Any:
    """A rich console on the terminal's stdout (results and summaries). Piped or redirected (`| grep`,
    `> runs.txt`), tables are as wide as their content instead of rich's 80 columns, so that no id or
    title is cut (COLUMNS is not read there: CI runners and pytest-xdist export 80); on a terminal they
    fit its width."""
    from rich.console import Console

    stream = console.out()
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(file=stream, width=None if tty else PIPED_WIDTH)


def _set_overrides(values: list[str] | None) -> dict[str, Any]:
    """`--set KEY=VALUE` options as dotted overrides, each value read as YAML (`3` an int, `[a, b]` a
    list, `none` a string: a setting cannot be unset from here). One `error:` line (exit 2) for a value
    without `=` or one that is not YAML."""
    out: dict[str, Any] = {}
    for item in values or ():
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            _fail(f"--set takes KEY=VALUE, e.g. --set train.epochs=3: got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            _fail(f"--set {key.strip()}: {text!r} is not a YAML value ({str(exc).splitlines()[0]})")
    return out


def _settings(config: Path | None, sets: list[str] | None = None, **overrides: Any) -> Settings:
    """Settings from `config` + env + `--set` + the command's own options (dotted keys; None = option not
    given; an option beats a --set of the same key)."""
    merged = _set_overrides(sets) | {k: v for k, v in overrides.items() if v is not None}
    try:
        return load_settings(config, merged)
    except ConfigError as exc:
        _fail(str(exc))
    raise AssertionError("unreachable")


def _warehouse(warehouse: Path | None, config: Path | None, workspace: Path | None = None) -> Path:
    """The warehouse a reading command opens: `--warehouse`, else the settings' (with `--workspace`, the
    workspace's, as the stage commands read `-w`). Where that file does not exist and nothing said where the
    pipeline ran (no --config, --workspace, $BRIDGEREC_CONFIG, $BRIDGEREC_WORKSPACE or $BRIDGEREC_WAREHOUSE),
    the likely cause is the missing config, not a missing publish: the `error:` line says so (a new user's
    trial: "run `bridgerec publish` first" right after a run)."""
    if warehouse is not None:
        return warehouse
    path = _settings(config, workspace=workspace).warehouse_path
    told = [CONFIG_ENV, f"{ENV_PREFIX}WORKSPACE", f"{ENV_PREFIX}WAREHOUSE"]  # where else it could come from
    said = config is not None or workspace is not None or any(os.environ.get(name) for name in told)
    if not path.exists() and not said:
        _fail(
            f"warehouse {path} does not exist: that is the default workspace's, since no config was given; "
            "pass the config the pipeline ran with (--config FILE or $BRIDGEREC_CONFIG) or --warehouse FILE "
            "(or run `bridgerec publish` first)"
        )
    return path


def _emit(result: Any, as_json: bool, render: Callable[[Any], None], failing: bool = False) -> None:
    """Print `result` (a typed summary, or a dict) as one JSON object, or through `render`. `failing`:
    what a command finished before the failure it goes on to `_fail` with; under --json it becomes part
    of the failure's object instead of an object of its own."""
    if not as_json:
        render(result)
        return
    data = result.model_dump(mode="json") if isinstance(result, BaseModel) else dict(result)
    answer = _answer() or _Answer("", True)
    if failing:
        answer.done = data
    else:
        answer.write({"ok": True} | data)


def _require_stages(names: Sequence[str]) -> None:
    """`error:` and exit 2 when `--force` names something that is not a stage, with the closest stage."""
    if not names:  # nothing to check: the stage table's modules (torch, vLLM) are not imported for it
        return
    from bridgerec.stages import STAGE

    if unknown := sorted(set(names) - set(STAGE)):
        close = [m for name in unknown for m in difflib.get_close_matches(name, list(STAGE), n=1)]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        _fail(f"--force names no stage: {', '.join(unknown)} (the stages: {', '.join(STAGE)}){hint}")


def _require_sources(settings: Settings, config: Path | None) -> None:
    """`error:` and exit 2 before a night is recorded when the settings name no input files to ingest, or
    when a named file is missing and the workspace does not exist yet: without it `bridgerec run` with no
    config (a new user's first try), or from another folder than the config's relative paths assume, made
    a workspace with a failed night in its warehouse before saying so. A file missing from a workspace
    that has run before stays that night's fault: a scheduled night records it, as it records any export
    that did not arrive."""
    from bridgerec.tasks.ingest import SourceError, check_input_files, input_files

    try:
        input_files(settings.ingest)
        if not settings.workspace.exists():  # a first night: nothing to record it in yet
            check_input_files(settings.ingest)
    except SourceError as exc:
        given = config is not None or bool(os.environ.get(CONFIG_ENV))
        hint = (
            ""
            if given
            else "; no config was given (--config FILE or $BRIDGEREC_CONFIG; the bundled sample's: "
            "configs/sample.yaml)"
        )
        _fail(str(exc) + hint)


def _default_workspace_note(settings: Settings) -> str:
    """What to add to a "run the earlier stage first" line when nothing named the workspace (no
    `workspace:` in the config, no --workspace, no $BRIDGEREC_WORKSPACE): the default one is likely not
    where the pipeline ran (a new user's trial: a config of one setting, `train: {epochs: 7}`, read the
    default ./workspace instead of the sample's)."""
    if "workspace" in settings.model_fields_set:
        return ""
    return (
        f"; the workspace ({settings.workspace}) is the default: neither the config nor --workspace or "
        f"${ENV_PREFIX}WORKSPACE names one (a config file is complete in itself: it does not extend "
        "another, so give it the `workspace:` of the run you mean)"
    )


def _require_free_workspace(settings: Settings, what: str) -> None:
    """`error:` and exit 2 when another live process is writing the workspace (a night, a stage command),
    with the line its lock gives (storage/workspace.py, `Workspace.writing`: `workspace ... is being
    written by pid ...`), before any input is checked: while a night was in its enrich stage, `bridgerec
    train` said its enrich inputs were missing (a new user's trial), when they were being written. The
    lock is taken and let go at once (the stage takes it again for its run); a workspace with no lock file
    has never been written, so nothing holds it, and nothing is made there."""
    from bridgerec.storage.workspace import LOCK_NAME, Workspace, WorkspaceBusy

    workspace = Workspace(settings.workspace)
    if not (workspace.root / LOCK_NAME).is_file():
        return
    try:
        with workspace.writing(what):
            pass
    except WorkspaceBusy as exc:
        _fail(str(exc))


def _check_inputs_quickly(name: str, settings: Settings, run_id: str | None = None) -> None:
    """The stage's input check (bridgerec/stages.py, the stage table's `check`) before the stage's modules,
    which import torch, vLLM and Prefect, are imported: the same functions for ingest, enrich and train
    (their modules import none of them); for publish, the run it would score (`find_trained_run`: the
    best run, or `run_id`), without the catalogue check. What it lets through, the full check sees after
    those imports."""
    from bridgerec.storage.workspace import Workspace
    from bridgerec.tasks.ingest import IngestOutputs

    workspace = Workspace(settings.workspace)
    if name == "ingest":
        from bridgerec.tasks.ingest import check_columns

        check_columns(settings.ingest)  # `_check_ingest`'s own call (the files, then their headers)
    elif name == "enrich":
        IngestOutputs(workspace).manifest()  # raises IngestMissing, as `_check_enrich`
    elif name == "train":  # the stage's own check: its module imports no torch
        from bridgerec.tasks import StageRun
        from bridgerec.tasks.train import check_train_inputs

        check_train_inputs(StageRun(settings.train, workspace))
    elif name == "publish":  # reads run records only: tasks/publish/trained.py
        from bridgerec.tasks.publish import find_trained_run

        find_trained_run(workspace, run_id)


def _run_stage(
    name: str,
    settings: Settings,
    force: bool,
    as_json: bool,
    verbose: bool,
    render: Callable[[Any], None],
    **options: Any,
) -> None:
    """Run stage `name` as its flow and print its summary. A fault the user can fix (bad input or config,
    a missing earlier stage: `InputError`, `FileNotFoundError`, `ValueError`) is one `error:` line and
    exit 2; the flow's logs keep the details.

    What can be checked without the stage's modules is checked first, before torch, vLLM and Prefect are
    imported (12 to 15 s on 2 cores, 42 s under load): the workspace held by another writer, then the
    earlier stage's outputs (a mistyped -w fails in a second or two, as `recs` does). An unreachable
    PREFECT_API_URL is said before the inputs (real-world case 26); its check reads Prefect's settings
    only."""
    _require_free_workspace(settings, f"stage {name}")
    _require_reachable_api()  # before the session: an unreachable API leaves no log file behind
    try:
        _check_inputs_quickly(name, settings, options.get("run_id"))
    except (InputError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc) + _default_workspace_note(settings))

    from prefect import tags as prefect_tags

    from bridgerec.flows.stage import run_stage
    from bridgerec.stages import STAGE

    hide_input_error_tracebacks()
    detach_temporary_server()
    if (check := STAGE[name].check) is not None:  # the stage's full check: a missing input fails before
        try:  # a flow starts and before a log folder is made in the workspace
            check(STAGE[name].stage_run(settings, force=force), **options)
        except (InputError, FileNotFoundError, ValueError) as exc:
            _fail(str(exc) + _default_workspace_note(settings))
    with _console(settings, name, as_json, verbose):
        progress.set_enabled(not as_json)
        stopped = (
            f"bridgerec {name} stopped by {{signal}}; what it finished is kept and a rerun resumes from it"
        )
        with _stoppable(lambda signum, _: stopped.format(signal=signum.name)):
            try:
                # as the stage/<name> deployments', + cli (the flow adds `workspace:`: flows/stage.py)
                with prefect_tags("bridgerec", "adhoc", "cli"):
                    summary = run_stage(name, settings, force=force, **options)
            except (InputError, FileNotFoundError, ValueError) as exc:
                _fail(str(exc))
            except RuntimeError as exc:  # the API server went away during the run
                if (gone := unreachable_in(exc)) is None:
                    raise
                _fail(str(gone))
        _emit(summary, as_json, render)


@contextlib.contextmanager
def _stoppable(message: Callable[[signal.Signals, BaseException], str]) -> Iterator[None]:
    """SIGTERM and SIGINT end the block as an error (runtime/signals.py): one `error:` line,
    `message(signal, exception)`, and the exit status 128 + the signal's number; the interpreter then
    exits normally, so Prefect's temporary API server stops with the command."""
    with stop_on_signals():
        try:
            yield
        except BaseException as exc:
            signum = stop_signal(exc)
            if signum is None or isinstance(exc, typer.Exit):
                raise
            _fail(message(signum, exc), code=128 + signum)


def _require_reachable_api() -> None:
    """One `error:` line, exit 2, when PREFECT_API_URL names a server that does not answer."""
    try:
        check_api()
    except PrefectUnreachable as exc:
        _fail(str(exc))


def _require_prefect_api() -> None:
    """`_require_reachable_api`; then the temporary server Prefect starts when no URL is set will be out
    of reach of a Ctrl-C (`detach_temporary_server`)."""
    _require_reachable_api()
    detach_temporary_server()


def _parse_domain_paths(values: list[str] | None, option: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for v in values or []:
        if "=" not in v:
            _fail(f"{option} takes DOMAIN=PATH, got {v!r}")
        domain, path = v.split("=", 1)
        out[domain.strip()] = Path(path)
    return out


@app.command()
def ingest(
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    sets: SetOpt = None,
    source: Annotated[
        str | None, typer.Option(help="generic | amazon2018 | amazon2023.", show_default=False)
    ] = None,
    items: Annotated[
        Path | None,
        typer.Option(help="generic: items file (.csv[.gz], .jsonl[.gz], .parquet).", show_default=False),
    ] = None,
    interactions: Annotated[
        Path | None, typer.Option(help="generic: interactions file.", show_default=False)
    ] = None,
    reviews: Annotated[
        list[str] | None,
        typer.Option(help="amazon*: DOMAIN=PATH of a reviews file (repeat).", show_default=False),
    ] = None,
    meta: Annotated[
        list[str] | None,
        typer.Option(help="amazon*: DOMAIN=PATH of a meta file (repeat).", show_default=False),
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if inputs and config are unchanged.")] = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Read raw interaction logs and item catalogues into clean Parquet in WORKSPACE/ingest.

    Checks every row: bad rows go to WORKSPACE/ingest/quarantine.parquet with a reason, and every row
    read is accounted for (read = kept + quarantined + filtered). An unchanged rerun is skipped.
    """
    reviews_map, meta_map = _parse_domain_paths(reviews, "--reviews"), _parse_domain_paths(meta, "--meta")
    amazon = None
    if reviews_map or meta_map:
        if set(reviews_map) != set(meta_map):
            _fail(
                f"--reviews and --meta must name the same domains: {sorted(reviews_map)} vs {sorted(meta_map)}"
            )
        amazon = {d: {"reviews": reviews_map[d], "meta": meta_map[d]} for d in reviews_map}
    settings = _settings(
        config,
        sets,
        workspace=workspace,
        **{
            "ingest.source": source,
            "ingest.items": items,
            "ingest.interactions": interactions,
            "ingest.amazon": amazon,
        },
    )
    _run_stage("ingest", settings, force, as_json, verbose, _render_ingest)


def _render_ingest(s: IngestSummary) -> None:
    from rich.table import Table

    out = _rich()
    head = (
        "ingest skipped: inputs and config unchanged"
        if s.skipped
        else f"ingest finished in {s.seconds:.1f} s"
    )
    out.print(f"[bold green]{head}[/] -> {s.workspace}/ingest")
    t = Table(show_header=False)
    t.add_row("users", f"{s.users:,}")
    t.add_row("overlapping users", f"{s.overlap_users:,}")
    t.add_row("items", f"{s.items:,}  " + ", ".join(f"{d}: {n:,}" for d, n in s.items_per_domain.items()))
    t.add_row("interactions", f"{s.interactions:,}")
    t.add_row(
        "quarantined",
        f"{s.quarantined:,}  " + ", ".join(f"{r}: {n:,}" for r, n in s.quarantined_by_reason.items()),
    )
    t.add_row("filtered", ", ".join(f"{r}: {n:,}" for r, n in s.filtered_by_reason.items()) or "0")
    if s.order_ties:
        t.add_row(
            "ordered by file order", f"{s.order_ties:,} (same time and position as another of the user's)"
        )
    out.print(t)


@app.command()
def enrich(
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    sets: SetOpt = None,
    max_users: Annotated[
        int | None,
        typer.Option("--max-users", help="profiles.max_users: profile at most N users.", show_default=False),
    ] = None,
    profiles_mode: Annotated[
        str | None, typer.Option("--profiles", help="profiles.mode: llm | none.", show_default=False)
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Rebuild even if unchanged (cached vectors/profiles are reused).")
    ] = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Embed item texts and write hierarchical LLM user profiles with vLLM into WORKSPACE/enrich.

    Incremental: only texts whose (text hash, model) is new are embedded, only users whose history
    changed get a new profile; an unchanged rerun starts no engine. Items or users that fail are in
    WORKSPACE/enrich/errors.parquet with the reason.
    """
    settings = _settings(
        config, sets, workspace=workspace, **{"profiles.max_users": max_users, "profiles.mode": profiles_mode}
    )
    _run_stage("enrich", settings, force, as_json, verbose, _render_enrich)


def _render_enrich(s: EnrichSummary) -> None:
    from rich.table import Table

    out = _rich()
    head = (
        "enrich skipped: inputs, config and models unchanged"
        if s.skipped
        else f"enrich finished in {s.seconds:.1f} s"
    )
    out.print(f"[bold green]{head}[/] -> {s.workspace}/enrich")
    t = Table(show_header=False)
    t.add_row("items", f"{s.items:,}: {s.items_embedded:,} embedded, {s.items_cached:,} cached")
    t.add_row(
        "embeddings",
        f"{s.embedding_dim}-d {s.embed_model_id}; tables {s.global_dim} / {s.local_dim}",
    )
    if s.profile_mode == "llm":
        t.add_row(
            "profiles",
            f"{s.profile_users:,} users: {s.profiles_generated:,} generated, {s.profiles_cached:,} cached "
            f"({s.llm_model_id})",
        )
    else:
        t.add_row("profiles", "off (profiles.mode = none)")
    t.add_row("errors", f"{s.errors:,} " + ", ".join(f"{k}: {v}" for k, v in s.errors_by_step.items()))
    if s.engines_started:
        t.add_row("engines", ", ".join(f"{e['runner']} {e['seconds']} s" for e in s.engines_started))
    out.print(t)


@models_app.command("prepare")
def models_prepare(
    config: ConfigOpt = None,
    force: Annotated[bool, typer.Option(help="Convert again even if the folder exists.")] = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Make the configured models usable offline: convert the packaged SmolLM2 GGUF into a safetensors
    folder (profiles.model, once, 15 to 40 s on 2 cores) and check the embedding model folder (with enrich.quantization:
    w8a8, make its INT8 copy in enrich.quantized_dir, once, ~1 s)."""
    from bridgerec.tasks.enrich import ModelError, embedding_model, model_id, prepare_profile_model

    settings = _settings(config)
    with _console(settings, "models-prepare", as_json, verbose):
        try:
            with progress.status("models: checking the embedding model"):
                embed_dir, embed_id = embedding_model(settings.enrich)
            result: dict[str, Any] = {"embedding_model": str(embed_dir), "embed_model_id": embed_id}
            if settings.profiles.mode == "llm":
                with progress.status("models: converting the GGUF model (once)"):
                    folder, converted = prepare_profile_model(settings.profiles, force=force)
                result |= {
                    "profile_model": str(folder),
                    "llm_model_id": model_id(folder, settings.profiles.model_name),
                    "converted": converted,
                }
        except ModelError as exc:
            _fail(str(exc))
        _emit(result, as_json, lambda r: typer.echo(yaml.safe_dump(r, sort_keys=False), file=console.out()))


@app.command()
def train(
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    sets: SetOpt = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="llm4cdsr-hybrid (the default) | llm4cdsr | llm4cdsr-noprofile | llm4cdsr-llmonly | sasrec | "
            "sasrec-domain | pop.",
            show_default=False,
        ),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", min=1, help="Upper bound on epochs.", show_default=False)
    ] = None,
    force: Annotated[bool, typer.Option(help="Retrain even if this run already finished.")] = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Train and evaluate the LLM4CDSR recommender or a baseline into WORKSPACE/runs/<run_id>.

    Early stopping on validation NDCG@10; then (train.refit, on by default) the best epoch's path is
    trained again with each user's validation item as a target too, and that model is tested and
    published. Test figures with 100 sampled negatives from the target's domain and with full ranking
    over it. An unchanged rerun is skipped; an interrupted one resumes from its last epoch.
    """
    settings = _settings(config, sets, workspace=workspace, **{"train.model": model, "train.epochs": epochs})
    _run_stage("train", settings, force, as_json, verbose, _render_train)


def _render_train(s: TrainSummary) -> None:
    from rich.table import Table

    out = _rich()
    head = "train skipped: already trained on these inputs" if s.skipped else f"trained in {s.seconds:.0f} s"
    out.print(
        f"[bold green]{head}[/]: {s.model} -> {s.run_dir}\n"
        f"{s.best_epoch_text()}, {s.epoch_seconds:.1f} s per epoch"
    )
    if s.init == "warm":
        start = s.init_valid_ndcg10
        out.print(
            f"warm start from {shown(str(s.warm_start_from))}"
            + (f" (validation NDCG@10 {start:.4f} before training)" if start is not None else "")
        )
    elif s.cold_start_reason:
        out.print(f"cold start: {shown(s.cold_start_reason)}")
    # new items' share of the full-ranking top 10: items without training interactions (their exposure)
    t = Table("test", "HR@10", "NDCG@10", "full HR@10", "full NDCG@10", "new items in top 10")
    full = s.test.get("full", {})
    for group, m in s.test.items():
        if group == "full":
            continue
        f = full.get(group, {})
        share = f.get("new_item_share@10")
        t.add_row(
            group,
            f"{m['hr@10']:.4f}",
            f"{m['ndcg@10']:.4f}",
            f"{f.get('hr@10', float('nan')):.4f}",
            f"{f.get('ndcg@10', float('nan')):.4f}",
            "-" if share is None else f"{share:.1%}",
        )
    out.print(t)


WarehouseOpt = Annotated[
    Path | None,
    typer.Option(
        "--warehouse", help="DuckDB warehouse file (overrides config `warehouse`).", show_default=False
    ),
]


@app.command()
def publish(
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    sets: SetOpt = None,
    warehouse: WarehouseOpt = None,
    k: Annotated[int | None, typer.Option("--k", min=1, help="Recommendations per user and domain.")] = None,
    run_id: Annotated[
        str | None,
        typer.Option(
            "--run-id",
            help="The trained run to publish (WORKSPACE/runs/RUN_ID, trained on the current catalogue: a run "
            "the quality gate refused, or an earlier one); default: the best on the current inputs.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Publish again even if this run is already published.")] = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Write the best trained run's (or --run-id's) top-k per user and domain to the DuckDB warehouse, with FAISS indexes.

    Users are scored in shards (`publish.users_per_shard`), each writing its own Parquet parts under
    `publish.data_dir` (default <warehouse name>.parts beside it; s3://bucket/prefix works too); the night
    then becomes visible in one atomic swap of the small warehouse file: analysts reading it meanwhile see
    the previous run or the new one. A failed publish leaves the warehouse as it was.
    Indexes are saved under <warehouse folder>/indexes/<run_id>/.
    Runs beyond `publish.retention_runs` lose their recommendations, profiles and indexes.
    """
    settings = _settings(config, sets, workspace=workspace, warehouse=warehouse, **{"publish.k": k})
    _run_stage("publish", settings, force, as_json, verbose, _render_publish, run_id=run_id)


def _render_publish(s: PublishSummary) -> None:
    out = _rich()
    if s.skipped:
        out.print(f"[bold green]publish skipped[/]: run {s.run_id} is already in {s.warehouse}")
        return
    out.print(f"[bold green]published run {s.run_id}[/] ({s.model}) in {s.seconds:.1f} s -> {s.warehouse}")
    out.print(
        f"{s.rows:,} rows: {s.users:,} users x {len(s.items_per_domain)} domains x k={s.k}; "
        f"indexes in {s.index_dir}"
    )
    shards, parts = _count(s.shards, "shard"), _count(s.parts, "part")
    out.print(f"{shards} wrote {parts}, {s.data_bytes / 1e6:.1f} MB, in {s.data_root}")
    for domain, kind in s.index_kinds.items():
        recall = s.index_recall.get(domain)
        out.print(
            f"index {domain}: {kind}"
            + (f", recall@{s.k} {recall:.3f} against exact search" if recall else "")
        )
    if s.recall_warning:
        out.print(f"[bold yellow]warning[/]: {s.recall_warning}")
    if s.purged_runs:
        out.print(f"retention purged: {', '.join(s.purged_runs)}")


@app.command()
def run(
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    sets: SetOpt = None,
    force: Annotated[
        list[str] | None,
        typer.Option(
            "--force",
            metavar="STAGE",
            help="Rebuild this stage even if its inputs are unchanged (repeat for several: --force train "
            "--force publish). A forced train starts cold: the periodic cold retrain that warm starts need.",
        ),
    ] = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run the nightly pipeline in-process on Prefect's local API: ingest -> enrich -> train -> publish.

    Stages whose inputs and config are unchanged are skipped, so a rerun after a crash resumes from the
    finished stages; `--force STAGE` rebuilds one anyway, and the stages after it rerun where its output
    changed. The same flow is deployed on a schedule from prefect.yaml (see docs/runbook.md).

    Exit codes: 0 published (or nothing new); 2 a fault to fix (a bad file or setting, a night stopped by
    its data checks); 3 the quality gate held tonight's run back (the serving lists unchanged); 1 any
    other failure; 143 / 130 stopped by SIGTERM / Ctrl-C.
    """
    _require_stages(force or ())
    settings = _settings(config, sets, workspace=workspace)  # validate early, with readable errors
    _require_sources(settings, config)
    _require_free_workspace(settings, "nightly")  # all three before torch, vLLM and Prefect are imported

    from prefect import tags as prefect_tags

    from bridgerec.flows.nightly import NightFailed, nightly_flow

    hide_input_error_tracebacks()
    _require_prefect_api()  # before the session: an unreachable API leaves no log file behind
    with handlers_restored(), _console(settings, "run", as_json, verbose):
        progress.set_enabled(not as_json)
        overrides = _set_overrides(sets) | ({"workspace": str(settings.workspace)} if workspace else {})

        def morning_read(r: Any) -> None:
            print_night_summary(r)

        def stopped(signum: signal.Signals, exc: BaseException) -> str:
            night = _night_summary(exc)
            if night is None:
                return (
                    f"bridgerec run stopped by {signum.name} before the night was recorded; nothing changed"
                )
            _emit(night, as_json, morning_read, failing=True)
            return (
                f"bridgerec run stopped by {signum.name} during stage {night.failed_stage}: night "
                f"{night.night_id} is recorded 'failed' in {night.warehouse}; `{resume_command(force, sets, config, workspace)}` again "
                "resumes from the stages it finished"
            )

        with _stoppable(stopped):
            try:
                stages = cast("list[Stage] | None", force)  # names checked above
                # as the deployment's, + where it came from (the flow adds `workspace:`: flows/stage.py)
                with prefect_tags("bridgerec", "nightly", "cli"):
                    result = nightly_flow(str(config) if config else None, overrides, stages)
            except NightFailed as exc:  # a refused or failed night still gets its morning read
                _emit(exc.summary, as_json, morning_read, failing=True)
                cause = input_error_in(exc) or unreachable_in(exc)
                if cause is not None:  # bad input, config or contract: the same line and code as the stage's
                    _fail(str(cause))
                if exc.summary.held:  # the gate's decision, not a failure of the code or the data
                    _fail(f"nightly run held: {exc}; the serving lists are unchanged", code=EXIT_HELD)
                _fail(f"nightly run failed: {exc}", code=EXIT_FAILURE)
            except Exception as exc:  # the flow logged the details; give the user the one line that matters
                cause = input_error_in(exc) or unreachable_in(exc)
                if cause is not None:  # bad input, config or contract: the same line and code as the stage's
                    _fail(str(cause))
                _fail(f"nightly run failed: {exc}", code=EXIT_FAILURE)
        _emit(result, as_json, morning_read)
        ignore_stop_signals()  # the night is recorded 'completed': Prefect's logs flushing cannot change that


def resume_command(
    force: Sequence[str] | None,
    sets: Sequence[str] | None = None,
    config: Path | None = None,
    workspace: Path | None = None,
) -> str:
    """The command that resumes a stopped night: with its `--config`, `--workspace` and `--set` settings
    and `--force` stages again, as given (without its config the rerun would read another workspace, or
    none), since a plain rerun skips a forced stage whose inputs did not change (a forced train stopped in
    epoch 4 resumes from its checkpoint only when forced again)."""
    import shlex

    given = [
        *([f"--config {shlex.quote(str(config))}"] if config is not None else []),
        *([f"--workspace {shlex.quote(str(workspace))}"] if workspace is not None else []),
        *(f"--set {shlex.quote(s)}" for s in sets or ()),
        *(f"--force {stage}" for stage in force or ()),
    ]
    return " ".join(["bridgerec run", *given])


@app.command()
def report(
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    night: Annotated[
        str | None,
        typer.Option(
            "--night", help="The night's id (`bridgerec runs list`); default: the newest.", show_default=False
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Rebuild the night report (an HTML page in WORKSPACE/reports/, opens without network) and print its
    path: quality against popularity across nights, lists, data checks, costs, example users.

    Every nightly run writes it; this rebuilds it for any night whose record is kept (WORKSPACE/nights/).
    """
    from bridgerec.tasks.report import ReportMissing, build_report

    settings = _settings(config, workspace=workspace)
    try:
        path = build_report(settings.workspace, night, settings.report).resolve()
    except ReportMissing as exc:
        _fail(str(exc))
    _emit(
        {"report": str(path), "night_id": path.stem, "url": path.as_uri()},
        as_json,
        lambda r: typer.echo(r["report"], file=console.out()),
    )


def _night_summary(exc: BaseException | None) -> Any:
    """The night's summary a stop signal carries (`Night.failing_on_error`), along its chain."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if (night := getattr(exc, "night_summary", None)) is not None:
            return night
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@app.command("deploy-check")
def deploy_check(
    what: Annotated[str, typer.Argument(help="home | config: which value to check and print.")],
    as_json: JsonOpt = False,
) -> None:
    """Check, when deploying, what a deployment will need when it runs; print it for prefect.yaml.

    `home`: the checkout the worker runs the flows from ($BRIDGEREC_HOME, else the directory the deploy
    runs in); it must hold flows/nightly.py. `config`: $BRIDGEREC_CONFIG (relative to home), which must
    exist and be a valid configuration; printed as an absolute path. Any problem stops `prefect deploy`
    with one `error:` line (prefect.yaml runs both as build steps).
    """
    home = Path(os.environ.get("BRIDGEREC_HOME") or Path.cwd()).expanduser().resolve()
    if what not in ("home", "config"):
        _fail(f"deploy-check takes 'home' or 'config', got {what!r}")
    if not (home / "flows" / "nightly.py").is_file():
        source = "$BRIDGEREC_HOME" if os.environ.get("BRIDGEREC_HOME") else "the deploy's directory"
        _fail(f"{home} ({source}) is not a bridgerec checkout: it has no flows/nightly.py")
    if what == "home":
        _emit({"home": str(home)}, as_json, lambda r: typer.echo(r["home"]))
        return
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        _fail(f"${CONFIG_ENV} is not set: set it to the pipeline config the deployments run with")
    path = Path(raw).expanduser()
    path = path if path.is_absolute() else home / path
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        _fail(f"${CONFIG_ENV}={raw}: " + " ".join(line.strip() for line in str(exc).splitlines()))
    _check_relative_inputs(settings, path, home)
    _emit({"config": str(path.resolve())}, as_json, lambda r: typer.echo(r["config"]))


def _check_relative_inputs(settings: Settings, config: Path, home: Path) -> None:
    """`error:` naming every relative path of the config that the deployed runs would not find as meant:
    they start in `home` and read relative paths from it (a config written beside its data ran from there
    by hand, and every deployed night failed at 02:00 in a new user's trial). An input file must be there
    from `home` (an absolute one may be missing at deploy time: tonight's export has not arrived); a
    workspace is refused where the config's folder has one and `home` has none (the deployed nights would
    start a second workspace in the checkout, cold, beside the one the commands use)."""
    from bridgerec.tasks.ingest import SourceError, input_files

    try:
        files = {f"ingest {role}": Path(f) for role, f in input_files(settings.ingest).items()}
    except SourceError as exc:
        _fail(f"${CONFIG_ENV}={config}: {exc}")
    folder = config.resolve().parent
    problems = []
    for what, path in files.items():
        if not path.is_absolute() and not (home / path).is_file():
            beside = " (the config's folder has it)" if (folder / path).is_file() else ""
            problems.append(f"{what} {path}{beside}")
    ws = settings.workspace
    if not ws.is_absolute() and (folder / ws).is_dir() and not (home / ws).exists():
        problems.append(f"workspace {ws} (the config's folder has it)")
    if problems:
        _fail(
            f"${CONFIG_ENV}={config}: relative paths the deployed runs would read from their working "
            f"directory, {home}, where they are not: {'; '.join(problems)}; make them absolute"
        )


@app.command()
def recs(
    user: Annotated[str, typer.Option("--user", "-u", help="The user's source id.")],
    domain: Annotated[str | None, typer.Option("--domain", "-d", help="Only this domain.")] = None,
    run_id: Annotated[
        str | None,
        typer.Option(
            "--run-id",
            "--run",
            help="Any retained run, or a night (the run it left serving): time travel; default: the latest.",
        ),
    ] = None,
    history: Annotated[
        int,
        typer.Option("--history", min=0, help="The user's most recent interactions shown (0: none)."),
    ] = 10,
    warehouse: WarehouseOpt = None,
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a user's top-k recommendations with item titles, their profile and their most recent history
    (read-only), from the latest run or from any retained run (`--run-id`; `bridgerec runs list` shows
    which are retained)."""
    from bridgerec.storage.warehouse import WarehouseError, user_recommendations

    path = _warehouse(warehouse, config, workspace)
    try:
        result = user_recommendations(path, user, domain, run_id, history)
    except WarehouseError as exc:
        _fail(str(exc))
    _emit(result, as_json, _render_recs)


def _render_recs(r: dict) -> None:
    from rich.table import Table

    out = _rich()
    # Ids, titles and profiles are data, neither rich markup nor terminal commands: `shown` escapes
    # their brackets and any control character left in them (runtime/terminal.py).
    out.print(f"[bold]user {shown(r['user_id'])}[/]  run {shown(r['run_id'])} ({shown(r['model'])})")
    none = "(none written for this user: profiles.max_users and profiles.select say whose are written)"
    out.print(f"[italic]profile:[/] {shown(r['profile'], none)}")
    for interest in r.get("interests") or []:
        out.print(f"  - {shown(interest)}")
    if r.get("history") is None:
        out.print(
            "[italic]recent history:[/] (none published with this run: publish.history off, or a run "
            "published before histories were)"
        )
    elif r["history"]:
        out.print("[italic]recent history[/] (newest first, as this run read it):")
        for h in r["history"]:
            when = f", {h['timestamp'][:10]}" if h.get("timestamp") else ""
            out.print(f"  - {shown(h['title'] or h['item_id'])} ({shown(h['domain'])}{when})")
    explained = any(row.get("because_item_id") for rows in r["recommendations"].values() for row in rows)
    for domain, rows in r["recommendations"].items():
        t = Table(title=domain, title_justify="left")
        for col in ("rank", "item_id", "title", "score", *(["because you had"] if explained else [])):
            t.add_column(col, justify="right" if col in ("rank", "score") else "left")
        for row in rows:
            cells = [str(row["rank"]), shown(row["item_id"]), shown(row["title"]), f"{row['score']:.4f}"]
            if explained:
                cells.append(_because_text(row))
            t.add_row(*cells)
        out.print(t)
    if explained:
        out.print(
            "[dim]because you had: the item of the user's history closest to the recommended one (cosine); "
            "closer than N %: closer to the history than N % of a sample of the domain's items are "
            "(about 50 %: no closer than chance)[/]"
        )
    else:
        out.print(
            "[dim]no explanations: the most popular items, popularity is their reason[/]"
            if r["model"] == "pop"
            else "[dim]no explanations in this run (a model without a text space, or publish.explain off)[/]"
        )


def _because_text(row: dict[str, Any]) -> str:
    """'<title> (0.83, closer than 97 %)': the user's history item closest to the recommended one, that
    cosine, and its percentile among the domain's reference items (absent in runs published before it)."""
    if not row.get("because_item_id"):
        return ""
    title = row.get("because_title") or row["because_item_id"]
    percentile = row.get("because_percentile")
    closer = f", closer than {percentile:.0f} %" if percentile is not None else ""
    return f"{shown(title)} ({row['because_score']:.2f}{closer})"


def duckdb_cli() -> str | None:
    """The DuckDB CLI to open: the binary of the duckdb-cli package (a dependency, so the one beside this
    Python: a 1.x CLI, which reads the warehouse as `publish.storage_compatibility` keeps it), else
    `duckdb` on PATH, else None."""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("duckdb_cli")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).with_name("duckdb")
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    return shutil.which("duckdb")


# DuckDB's hints after the first line of its message: a name it knows that is close to a misspelt one.
_DUCKDB_HINTS = ("Did you mean", "Candidate bindings", "Candidate tables")


def _duckdb_message(exc: Exception) -> str:
    """DuckDB's error on one line: its first line, and its hint of the names meant, if it gave one
    (`Did you mean "recommendations"?`, `Candidate bindings: "title", ...`). The rest (the statement
    quoted back with a caret) is left out: the user has it on their own command line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    hints = [line for line in lines[1:] if line.startswith(_DUCKDB_HINTS)]
    return " ".join(lines[:1] + hints)


def sql_shell_command(warehouse: Path, duckdb_cli: str | None) -> list[str] | None:
    """The DuckDB CLI's argv for a read-only session on `warehouse` (`-readonly`: a read-write session
    would lock every other reader and the next publish out), or None when there is no CLI."""
    return [duckdb_cli, "-readonly", str(warehouse)] if duckdb_cli else None


SQL_BANNER = """bridgerec sql: a read-only DuckDB connection `con` on {path}
(a Python shell{why}: type Python, not SQL).
  con.sql("SELECT * FROM latest_recommendations LIMIT 10").show()
  con.sql("SHOW TABLES").show()          # runs, recommendations, metrics, items, user_profiles, ...
  con.execute("SELECT ... WHERE user_id = ?", [user_id]).fetchall()
Example queries: docs/publish.md, "Example SQL for analysts". Ctrl-D leaves."""


@app.command()
def sql(
    warehouse: WarehouseOpt = None,
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    query: Annotated[
        str | None,
        typer.Option("--query", "-q", help="Run this SQL, print the result and leave.", show_default=False),
    ] = None,
    as_json: Annotated[
        bool, _json_opt("With --query: one JSON object (ok, columns, rows) on stdout, also on failure.")
    ] = False,
    python: Annotated[
        bool,
        typer.Option(
            "--python",
            help="A Python shell with a read-only DuckDB connection `con` instead of the DuckDB CLI "
            "(for pandas, plots, or your own code).",
        ),
    ] = False,
) -> None:
    """Open a read-only SQL session on the warehouse: the DuckDB CLI (`duckdb -readonly FILE`, from the
    duckdb-cli package the set-up installs; end each statement with `;`, `.quit` or Ctrl-D leaves). With
    --python, or where no DuckDB CLI is found, a Python shell with a read-only DuckDB connection `con`.
    Read-only, so nobody has to remember `-readonly`: a read-write session would block every reader and
    the next publish.

    With --query, run one statement and print its result (a table, or --json) instead.

    Parts on S3 (`publish.data_dir: s3://...`): use --python or --query, which read them through
    pyarrow's S3 filesystem; the DuckDB CLI needs its httpfs extension, downloaded at first use.
    """
    import duckdb

    from bridgerec.storage.warehouse import WarehouseError, connect_reader
    from bridgerec.storage.warehouse.parts import object_store_error

    if query is not None and python:
        _fail("--python opens an interactive Python shell and --query runs one statement: give one of them")
    if as_json and query is None:
        _fail("--json answers a --query with one JSON object; a shell has no JSON answer: add --query SQL")
    path = _warehouse(warehouse, config, workspace).expanduser().resolve()
    try:
        con = connect_reader(path)  # the same checks (missing, held read-write) for every way in
    except WarehouseError as exc:
        _fail(str(exc))
    if query is not None:
        try:
            rel = con.sql(query)
            columns = list(rel.columns) if rel is not None else []
            rows = rel.fetchall() if rel is not None else []
            single = [str(t).startswith("FLOAT") for t in rel.types] if rel is not None else []
        except duckdb.Error as exc:
            if (remote := object_store_error(exc)) is not None:
                _fail(str(remote))
            _fail(f"{type(exc).__name__}: {_duckdb_message(exc)}")
        finally:
            con.close()
        shown_rows = [[_float32(v) if f else v for v, f in zip(r, single, strict=True)] for r in rows]
        result = {"warehouse": str(path), "columns": columns, "rows": shown_rows}
        _emit(result, as_json, _render_sql)
        return
    argv = None if python else sql_shell_command(path, duckdb_cli())
    if argv is not None:
        con.close()
        os.execvp(argv[0], argv)  # the DuckDB CLI replaces this process
    import code

    why = "" if python else "; no DuckDB CLI found: `pip install duckdb-cli` gives the SQL shell"
    code.interact(
        banner=SQL_BANNER.format(path=path, why=why), local={"con": con, "duckdb": duckdb}, exitmsg=""
    )
    con.close()


def _float32(value: Any) -> Any:
    """A FLOAT (float32) value, or a FLOAT[] list, as the shortest decimal that reads back to the same
    float32 (what DuckDB's own shell prints: 12.953, not the double 12.95300006866455); None stays."""
    import numpy as np

    if isinstance(value, list):
        return [_float32(v) for v in value]
    if value is None:
        return None
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def _render_sql(r: dict) -> None:
    from rich.table import Table

    t = Table(*[shown(c) for c in r["columns"]])
    for row in r["rows"]:
        t.add_row(*[shown("NULL" if v is None else str(v)) for v in row])
    _rich().print(t)
    _rich().print(f"{len(r['rows']):,} rows")


@runs_app.command("list")
def runs_list(
    warehouse: WarehouseOpt = None,
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Show at most this many runs.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the runs in the warehouse, newest first: published runs (`retained` ones still have their
    recommendations; the one analysts see now is marked `serving`) and the nightly flow's nights (status,
    the quality gate's decision). `valid NDCG@10` (full ranking): a published run's own; a night's, its
    gate's score of the night's run (on an unchanged night, which the gate does not score, the published
    run's own)."""
    from bridgerec.storage.warehouse import WarehouseError, list_runs

    path = _warehouse(warehouse, config, workspace)
    try:
        runs = list_runs(path, limit)
    except WarehouseError as exc:
        _fail(str(exc))
    _emit({"warehouse": str(path), "runs": runs}, as_json, _render_runs)


def _render_runs(result: dict) -> None:
    from datetime import UTC

    from rich.table import Table

    out = _rich()
    t = Table(title=f"runs in {shown(str(result['warehouse']))}", title_justify="left")
    columns = (
        "run_id",
        "kind",
        "status",
        "gate",
        "valid NDCG@10",
        "model",
        "finished (UTC)",
        "users",
        "rows",
        "retained",
    )
    for col in columns:
        t.add_column(col, overflow="fold")  # a narrow terminal wraps an id, never cuts it
    for r in result["runs"]:
        finished = r["finished_at"].astimezone(UTC).strftime("%Y-%m-%d %H:%M") if r["finished_at"] else ""
        valid = r.get("valid_ndcg10")
        t.add_row(
            shown(r["run_id"]),
            r.get("kind") or "publish",
            r["status"] + (" (serving)" if r.get("serving") else ""),
            r.get("gate") or "",
            f"{valid:.4f}" if valid is not None else "",
            shown(r["model"]),
            finished,
            f"{r['n_users']:,}" if r["n_users"] is not None else "",
            f"{r['n_recommendations']:,}" if r["n_recommendations"] is not None else "",
            "" if r.get("kind") == "night" else ("yes" if r["retained"] else "no"),  # a night holds no rows
        )
    out.print(t)
    for r in result["runs"]:
        if r["message"]:
            out.print(f"{shown(r['run_id'])} {r['status']}: {shown(r['message'])}", soft_wrap=True)
        elif r.get("gate_message"):
            out.print(f"{shown(r['run_id'])} gate {r['gate']}: {shown(r['gate_message'])}", soft_wrap=True)


@warehouse_app.command("relink")
def warehouse_relink(
    warehouse: WarehouseOpt = None,
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Rewrite the warehouse's views for the folder it is in now, after the workspace was moved or is
    mounted elsewhere, so that plain DuckDB clients read its parts there (one atomic swap, nothing else
    changes; bridgerec's own readers and `bridgerec.storage.warehouse.connect` need no relink)."""
    from bridgerec.storage.warehouse import WarehouseError, relink

    path = _warehouse(warehouse, config, workspace)
    try:
        relink(path)
    except WarehouseError as exc:
        _fail(str(exc))
    _emit(
        {"warehouse": str(path), "relinked": True},
        as_json,
        lambda r: typer.echo(f"relinked {r['warehouse']}: its views read the parts where the file is now"),
    )


@config_app.command("show")
def config_show(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    as_json: Annotated[
        bool, _json_opt("JSON instead of YAML (a failure is one JSON object with ok, error, exit_code).")
    ] = False,
    reference: Annotated[
        bool,
        typer.Option(
            "--reference",
            help="Every setting's key, default, env var and description instead of the values in effect "
            "(Markdown: docs/settings.md; --json: one row per setting).",
        ),
    ] = False,
) -> None:
    """Print the effective configuration (file + env vars + defaults); `train` with the switches of its
    model preset applied (`train.model`: what the model is built from), `warehouse` the file the commands
    use (WORKSPACE/warehouse.duckdb unless set). With --reference: what every setting is."""
    if reference:
        from bridgerec.config import settings_reference, settings_reference_markdown

        if as_json:
            typer.echo(json.dumps({"ok": True, "settings": settings_reference()}, indent=2))
        else:
            typer.echo(settings_reference_markdown(), nl=False)
        return
    settings = _settings(config, sets)
    data = settings.model_dump(mode="json") | {"warehouse": str(settings.warehouse_path)}
    data["train"] = settings.train.model_dump(mode="json")
    if as_json:
        typer.echo(json.dumps({"ok": True} | data, indent=2))
    else:
        typer.echo(yaml.safe_dump(data, sort_keys=False))


def _reflow(doc: str) -> str:
    """A docstring as `--help` shows it: its paragraphs (blank-line separated) each one line, which the
    help screen wraps to the terminal. Typer 0.29's rich help keeps a docstring's own line breaks, so a
    paragraph written at 110 columns came out broken mid-sentence on an 80-column terminal."""
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n"))


def _reflow_helps(*typers: typer.Typer) -> None:
    """Give every command without an explicit `help` its docstring reflowed (`_reflow`)."""
    for t in typers:
        for command in t.registered_commands:
            if command.help is None and command.callback is not None and command.callback.__doc__:
                command.help = _reflow(command.callback.__doc__)


_reflow_helps(app, config_app, models_app, runs_app, warehouse_app)


def _command_words(argv: list[str]) -> str:
    """The command a command line names (`warehouse relink`), for the answer to a line click did not
    understand: its words while they name a command or group, else the first word as typed."""
    import typer.main

    command: Any = typer.main.get_command(app)
    words: list[str] = []
    for word in argv:
        commands = getattr(command, "commands", None)
        if not commands or word not in commands:
            break
        words.append(word)
        command = commands[word]
    return " ".join(words or argv[:1])


def main() -> None:
    """The `bridgerec` program: the commands, plus one `error:` line on the terminal for a failure no
    command expected (its traceback goes to the log file when there is one) and, under --json, the
    failure's JSON object on stdout, also when the command line itself was not understood."""
    _Answer.current, _Program.usage_error = None, None
    try:
        app(prog_name="bridgerec")  # also under `python -m bridgerec.cli`: the name users type
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_FAILURE)
        answer = _Answer.current or _Answer(_command_words(sys.argv[1:]), "--json" in sys.argv[1:])
        if code != 0:  # a usage error click reported on stderr; a command's own failure has answered
            answer.failure(
                f"the command line was not understood: {_Program.usage_error or 'see stderr'}", code
            )
        raise
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        log = console.log_path()
        traceback.print_exc()  # sys.stderr: the log file in a quiet session, else the terminal
        where = f"; the traceback is in {log}" if log is not None else ""
        typer.secho(
            f"error: {type(exc).__name__}: {exc}{where}", fg=typer.colors.RED, err=True, file=console.err()
        )
        if _Answer.current is not None:
            _Answer.current.failure(f"{type(exc).__name__}: {exc}", EXIT_FAILURE)
        sys.exit(EXIT_FAILURE)
    finally:
        # The command's outcome is decided and reported: a Ctrl-C while the process shuts down (Prefect
        # stopping its temporary API server at exit) must not turn a night recorded 'completed' into exit
        # 130 (a new user's trial, 2026-12-07).
        ignore_stop_signals()


if __name__ == "__main__":  # pragma: no cover
    main()
