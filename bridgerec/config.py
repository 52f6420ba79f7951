"""The one settings tree: a YAML file, then `BRIDGEREC_*` env vars, then explicit overrides.

Precedence, highest first: values passed in code (CLI flags) > env vars > the YAML file > defaults.
Relative paths are relative to the working directory.
Nested keys in env vars are joined by `__`: `BRIDGEREC_PROFILES__MAX_USERS=100`.
Each stage receives its own section, never the whole tree.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from bridgerec.runtime.errors import InputError
from bridgerec.tasks.enrich import EnrichSettings, ProfileSettings, model_cache
from bridgerec.tasks.ingest import IngestSettings
from bridgerec.tasks.publish import PublishSettings
from bridgerec.tasks.quality import DataCheckSettings, GateSettings
from bridgerec.tasks.report import ReportSettings
from bridgerec.tasks.train import TrainSettings

ENV_PREFIX = "BRIDGEREC_"
CONFIG_ENV = "BRIDGEREC_CONFIG"


class StageTimeouts(BaseModel):
    """Each stage's time budget in seconds (Prefect's `timeout_seconds` on the stage's flow run); past it
    the stage fails (StageOverBudget) and the night with it. None: no budget. Far above what a healthy
    stage takes on the data it was sized for: a ceiling against a hang, not a schedule."""

    model_config = ConfigDict(extra="forbid")
    ingest: float | None = Field(
        default=2 * 3600.0, gt=0, description="Budget of the ingest stage (s); null = no budget."
    )
    enrich: float | None = Field(
        default=24 * 3600.0,
        gt=0,
        description="Budget of the enrich stage (s): embeddings and LLM profiles; null = no budget.",
    )
    train: float | None = Field(
        default=24 * 3600.0,
        gt=0,
        description="Budget of the train stage (s); train.time_budget_s stops training itself earlier, at an "
        "epoch boundary, keeping the best epoch; null = no budget.",
    )
    publish: float | None = Field(
        default=2 * 3600.0, gt=0, description="Budget of the publish stage (s); null = no budget."
    )


StageName = Literal["ingest", "enrich", "train", "publish"]


class ShardResources(BaseModel):
    """What one shard task of a stage asks Ray for (`ray.remote(num_cpus=..., num_gpus=...)`)."""

    model_config = ConfigDict(extra="forbid")
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs a shard task reserves on its node.")
    num_gpus: float = Field(
        default=0.0,
        ge=0,
        description="GPUs a shard task reserves (a fraction shares one GPU). Ray picks the GPU and sets "
        "CUDA_VISIBLE_DEVICES for the task itself: never set it by hand.",
    )


class RaySettings(BaseModel):
    """The Ray cluster of `runtime.runner: ray` (prefect-ray's `RayTaskRunner`)."""

    model_config = ConfigDict(extra="forbid")
    address: str = Field(
        default="",
        description="Empty: start a local Ray for this run (and stop it after); 'auto': the cluster this "
        "machine belongs to (`ray start`); 'ray://HOST:10001': a remote cluster through Ray Client; "
        "'HOST:6379': a cluster's head (GCS) address, from a machine of the cluster.",
    )
    num_cpus: int | None = Field(
        default=None, ge=1, description="CPUs of a local Ray started for the run; None = all cores."
    )
    num_gpus: int | None = Field(
        default=None, ge=0, description="GPUs of a local Ray started for the run; None = all it finds."
    )
    dashboard: bool = Field(
        default=False,
        description="Start the Ray dashboard with a local Ray (a cluster started by `ray start` has its own).",
    )
    connect_timeout_s: float = Field(
        default=5.0, gt=0, description="How long to wait for a cluster address to answer before failing."
    )
    resources: dict[StageName, ShardResources] = Field(
        default_factory=dict,
        description="Per stage, what each of its shard tasks reserves; a stage not named reserves 1 CPU and "
        "no GPU. enrich and publish have shard tasks; ingest and train have none, so entries for them "
        "change nothing (data-parallel training reserves through train.data_parallel).",
    )

    def shard_resources(self, stage: str) -> ShardResources:
        return self.resources.get(stage, ShardResources())  # type: ignore[call-overload]


class RuntimeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threads: int = Field(default=0, ge=0, description="CPU threads for DuckDB/torch/FAISS; 0 = all cores.")
    runner: Literal["local", "processes", "ray"] = Field(
        default="local",
        description="Where the flows run a stage's shard task runs (enrich's item and profile shards, "
        "publish's user shards): local (one after another in the flow's process, sharing its engines), "
        "processes (`workers` worker processes, each with engines of its own: a machine with several GPUs "
        "or many cores) or ray (Ray tasks on the cluster of `ray.address`, each reserving `ray.resources`; "
        "a CPU worker process keeps its engines for the whole night, a GPU shard gets a fresh process).",
    )
    workers: int = Field(
        default=2,
        ge=1,
        description="Worker processes for runner: processes. They share `threads` (each gets threads / "
        "workers, at least 1; enrich's engines on cores of their own), and enrich and publish cut at least "
        "this many shards.",
    )
    ray: RaySettings = Field(default_factory=RaySettings)
    log_level: str = Field(
        default="INFO",
        pattern="^(DEBUG|INFO|WARNING|ERROR)$",
        description="The least level of bridgerec's own log records (in the log file, on the terminal and in "
        "Prefect's run logs; WARNING keeps only warnings and errors) in the command's process; worker "
        "processes of `runner: processes` or ray log at INFO. Prefect's and third-party records keep theirs.",
    )
    stage_retries: int = Field(
        default=1,
        ge=0,
        description="Retries of a stage that failed transiently in the nightly flow; a fault of the input, "
        "the config or a stall is not retried.",
    )
    retry_delay_seconds: float = Field(default=30.0, ge=0, description="Wait before retrying a stage.")
    keep_logs: int = Field(
        default=30,
        ge=1,
        description="Log files of commands kept in WORKSPACE/logs (the newest; each command writes one).",
    )
    stage_timeout_seconds: StageTimeouts = Field(default_factory=StageTimeouts)
    stall_seconds: float | None = Field(
        default=1800.0,
        gt=0,
        description="A stage whose progress (batches, shards, steps) does not move for this long fails with "
        "a message naming where it is stuck, instead of running on (runtime/watchdog.py); None = off.",
    )

    def resolved_threads(self) -> int:
        return self.threads or os.cpu_count() or 1


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_default=True
    )
    _yaml_file: ClassVar[Path | None] = None

    workspace: Path = Field(default=Path("workspace"), description="Folder holding every stage's output.")
    warehouse: Path | None = Field(
        default=None,
        description="The DuckDB warehouse; unset = WORKSPACE/warehouse.duckdb (it follows the workspace, and "
        "the FAISS indexes go beside it). Use `warehouse_path` to read it.",
    )
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    enrich: EnrichSettings = Field(default_factory=EnrichSettings)
    profiles: ProfileSettings = Field(default_factory=ProfileSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    publish: PublishSettings = Field(default_factory=PublishSettings)
    checks: DataCheckSettings = Field(default_factory=DataCheckSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    report: ReportSettings = Field(default_factory=ReportSettings)

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        """Keys that moved: `enrich.task_runner` (sequential | processes) and `enrich.workers` are
        `runtime.runner` (local | processes) and `runtime.workers` since the runner serves every stage."""
        enrich = data.get("enrich") if isinstance(data, dict) else None
        if not isinstance(enrich, dict) or not {"task_runner", "workers"} & enrich.keys():
            return data
        enrich, runtime = dict(enrich), dict(data.get("runtime") or {})
        if "task_runner" in enrich:
            old = enrich.pop("task_runner")
            runtime.setdefault("runner", "local" if old == "sequential" else old)
        if "workers" in enrich:
            runtime.setdefault("workers", enrich.pop("workers"))
        logging.getLogger("bridgerec").warning(
            "config: enrich.task_runner and enrich.workers are now runtime.runner (local | processes) and "
            "runtime.workers; please rename them"
        )
        return data | {"enrich": enrich, "runtime": runtime}

    @property
    def warehouse_path(self) -> Path:
        """The warehouse file: `warehouse` when set, else `workspace/warehouse.duckdb`."""
        return self.warehouse if self.warehouse is not None else self.workspace / "warehouse.duckdb"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=cls._yaml_file))
        return tuple(sources)


class ConfigError(InputError):
    """A config value is invalid; the message names the key and the value."""


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        env = ENV_PREFIX + "__".join(str(p) for p in e["loc"]).upper()
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        msg = "no such setting" + _did_you_mean(e["loc"]) if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{key}{shown}: {msg} (YAML key '{key}' or env {env})")
    if len(lines) == 1:  # the usual case: the one `error:` line a user sees
        return f"invalid configuration: {lines[0]}"
    return "invalid configuration:\n" + "\n".join(f"  {line}" for line in lines)


def _check_env_sections(environ: Mapping[str, str]) -> None:
    """Raise ConfigError for a nested `BRIDGEREC_<SECTION>__<KEY>` variable whose section does not exist
    (`BRIDGEREC_TRIAN__EPOCHS`): pydantic-settings reads only the variables of known fields and would
    ignore it without a word. (A known section's unknown key is refused by validation itself; variables
    without `__`, such as BRIDGEREC_CONFIG or BRIDGEREC_VERBOSE, are not settings of a section.)"""
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, rest = name[len(ENV_PREFIX) :].split("__", 1)
        if section.lower() in Settings.model_fields:
            continue
        close = difflib.get_close_matches(section.lower(), list(Settings.model_fields), n=1)
        hint = f", did you mean {ENV_PREFIX}{close[0].upper()}__{rest}?" if close else ""
        raise ConfigError(
            f"environment variable {name}: no such setting section {section.lower()!r}{hint} "
            f"(sections: {', '.join(Settings.model_fields)})"
        )


def _did_you_mean(loc: tuple[int | str, ...]) -> str:
    """The hint for an unknown key at `loc`: ", did you mean 'train.model'?" where a setting of its section
    is close to it (difflib's ratio >= 0.6), else ""."""
    model: type[BaseModel] | None = Settings
    for part in loc[:-1]:  # down to the section the unknown key sits in
        field = model.model_fields.get(str(part)) if model is not None else None
        kind = field.annotation if field is not None else None
        model = kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f", did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""


def _yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """One line for a YAML parse error: the file, where (1-based line and column) and what."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
        if exc.context and exc.context_mark is not None:
            where += (
                f" ({exc.context} at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1})"
            )
        return f"config file {path} is not valid YAML: {where}"
    return f"config file {path} is not valid YAML: " + " ".join(str(exc).split())


def nest_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """{"train.epochs": 2, "publish": {"k": 10}, "warehouse": None} -> {"train": {"epochs": 2},
    "publish": {"k": 10}}: dotted keys become nested mappings, None values (an option not given) drop out."""
    out: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            node[leaf] = _deep_merge(node[leaf], value)
        elif isinstance(value, Mapping):
            node[leaf] = _deep_merge({}, value)
        else:
            node[leaf] = value
    return out


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            current = out.get(key)
            out[key] = _deep_merge(current if isinstance(current, dict) else {}, value)
        else:
            out[key] = value
    return out


def load_settings(
    config_file: Path | str | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """The effective settings: `overrides` > `BRIDGEREC_*` env vars > the YAML file > defaults.

    The one loading path of every entry point (CLI commands, the nightly and stage flows). `config_file`
    defaults to $BRIDGEREC_CONFIG, else none. `overrides` takes dotted keys (`{"train.epochs": 2}`) or
    nested mappings (`{"train": {"epochs": 2}}`), merged key by key into the file's and env's values;
    None values are ignored. Raises ConfigError (naming the key, the value, the YAML key and env var).
    """
    path = config_file or os.environ.get(CONFIG_ENV)
    yaml_path: Path | None = None
    if path:
        yaml_path = Path(path).expanduser()
        if yaml_path.is_dir():
            raise ConfigError(
                f"config file {yaml_path} is a folder: give the YAML file (e.g. configs/sample.yaml)"
            )
        if not yaml_path.is_file():
            raise ConfigError(f"config file {yaml_path} does not exist")
        try:
            loaded = yaml.safe_load(yaml_path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(_yaml_error(yaml_path, exc)) from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {yaml_path} must hold a mapping at the top level")
    _check_env_sections(os.environ)
    Settings._yaml_file = yaml_path
    try:
        settings = Settings(**nest_overrides(overrides))
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None
    finally:
        Settings._yaml_file = None
    return settings


def settings_reference() -> list[dict[str, str]]:
    """Every setting of the tree, in order: `section` (its top-level key, "" for the top level), `key`
    (dotted), `default` (as text: "unset" for None, mappings and lists as JSON, the user's model cache as
    its usual place, so the text is the same on every machine), `env` (its variable) and `description`.
    A setting whose value is itself a section (`runtime.ray`) is expanded into its settings; defaults are
    read from the default tree, so a section's own defaults for an inner one (`profiles.engine`) and
    `train`'s preset (`train.model`) show as they apply."""
    rows: list[dict[str, str]] = []
    for name, f in Settings.model_fields.items():
        value = f.get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            rows += _rows(name, name, value)
        else:
            rows.append(_row("", name, f, value))
    return sorted(rows, key=lambda r: r["section"] != "")  # the top level first, then file order


def settings_reference_markdown() -> str:
    """`settings_reference` as Markdown, one table per section (docs/settings.md is this text, checked by
    a test)."""
    rows = settings_reference()
    lines = [
        "# Settings",
        "",
        "Every setting, its default and its env var, generated from the settings classes "
        "(`bridgerec config show --reference`; without `--reference` it prints the values in effect). A "
        "config file gives them as nested YAML keys (`train: {epochs: 7}`), `--set train.epochs=7` for one "
        "command, `BRIDGEREC_TRAIN__EPOCHS=7` from the environment (lists and mappings as JSON). "
        "Precedence: `--set` > env vars > the file > defaults. `train`'s model presets set some "
        "switches of their own (docs/train.md).",
    ]
    for name in dict.fromkeys(r["section"] for r in rows):
        cls = _section(Settings.model_fields[name].annotation) if name else None
        doc = " ".join((cls.__doc__ or "").split()) if cls is not None else ""
        lines += ["", f"## `{name}`" if name else "## Top level", "", *([doc, ""] if doc else [])]
        lines += ["| setting | default | env var | what it does |", "|---|---|---|---|"]
        lines += [_markdown_row(r) for r in rows if r["section"] == name]
    return "\n".join(lines) + "\n"


def _markdown_row(r: dict[str, str]) -> str:
    about = r["description"].replace("|", r"\|")  # a pipe in a description would end the cell
    return f"| `{r['key']}` | `{r['default']}` | `{r['env']}` | {about} |"


def _section(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _rows(section: str, prefix: str, values: BaseModel) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for name, f in type(values).model_fields.items():
        value = getattr(values, name)
        key = f"{prefix}.{name}"
        rows += _rows(section, key, value) if isinstance(value, BaseModel) else [_row(section, key, f, value)]
    return rows


def _row(section: str, key: str, field: Any, default: Any) -> dict[str, str]:
    import json

    from pydantic_core import to_jsonable_python

    default = to_jsonable_python(default)  # as `config show --json` writes it (paths, datetimes)
    shown = "unset" if default is None else '""' if default == "" else json.dumps(default).strip('"')
    return {
        "section": section,
        "key": key,
        # the user's model cache is this machine's: shown as its usual place (the description names both)
        "default": shown.replace(str(model_cache()), "~/.cache/bridgerec/models"),
        "env": ENV_PREFIX + key.upper().replace(".", "__"),
        "description": " ".join((field.description or "").split()),
    }
