"""Settings of the ingest stage (section `ingest` of the config)."""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bridgerec.storage.workspace import StageSettings

SourceKind = Literal["generic", "amazon2018", "amazon2023"]


class AmazonDomainFiles(BaseModel):
    """The two raw files of one Amazon category."""

    model_config = ConfigDict(extra="forbid")
    reviews: Path
    meta: Path


class KCoreSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool | None = Field(
        default=None, description="Iterative joint k-core; None = on for Amazon sources, off for generic."
    )
    user_min: int = Field(default=5, ge=1, description="Minimum interactions per user (all domains).")
    item_min: int = Field(default=3, ge=1, description="Minimum interactions per item.")


class TimeWindow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: datetime | None = Field(default=None, description="Keep interactions at or after (UTC).")
    end: datetime | None = Field(default=None, description="Keep interactions before (UTC).")

    @model_validator(mode="after")
    def _ordered(self) -> TimeWindow:
        if self.start and self.end and self.start >= self.end:
            raise ValueError(f"time_window.start ({self.start}) must be before time_window.end ({self.end})")
        return self

    @property
    def active(self) -> bool:
        return self.start is not None or self.end is not None


class TimestampSettings(BaseModel):
    """How epoch numbers are read and which instants are plausible (others: `bad_timestamp`)."""

    model_config = ConfigDict(extra="forbid")
    unit: Literal["auto", "s", "ms", "us", "ns"] = Field(
        default="auto",
        description=(
            "Unit of epoch numbers; auto = by magnitude (|x| < 1e11: s, < 1e14: ms, < 1e17: us, else ns), "
            "which is unambiguous for instants between 1973 and 5138."
        ),
    )
    min: datetime = Field(
        default=datetime(1990, 1, 1, tzinfo=UTC),
        description="Earliest plausible instant (UTC); earlier ones are quarantined as bad_timestamp.",
    )
    max: datetime | None = Field(
        default=None,
        description="Latest plausible instant (UTC); None = one day after the ingest runs.",
    )

    naive_zone: str = Field(
        default="UTC",
        description=(
            "Time zone of timestamps written without one (ISO text without an offset such as "
            "'2020-09-14 16:13:20', dates, Parquet TIMESTAMP columns without a zone): an IANA name "
            "('Europe/Berlin') or a fixed offset ('+05:30'). UTC unless set, whatever the machine's zone "
            "(TZ): the same files give the same instants on every machine. Values with an offset or 'Z' "
            "keep theirs; epoch numbers are instants."
        ),
    )

    format: str | None = Field(
        default=None,
        description=(
            "strptime format of text timestamps (DuckDB's specifiers), for exports in another form, e.g. "
            "'%m/%d/%Y %H:%M' for '05/11/2024 16:08' or '%d.%m.%Y' for '11.05.2024'; every value is then "
            "read with it (epoch numbers are not). null = epoch numbers (see unit) or ISO 8601 text "
            "('2024-05-11', '2024-05-11 16:08:00', '2024-05-11T16:08:00Z', '2024-05-11 16:08:00+02:00')."
        ),
    )

    @field_validator("naive_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return normalise_zone(value)

    @field_validator("format")
    @classmethod
    def _format(cls, value: str | None) -> str | None:
        if value is None:
            return None
        import duckdb

        try:
            duckdb.execute("SELECT try_strptime('', $1)", [value]).fetchall()
        except duckdb.Error as exc:
            raise ValueError(
                f"format {value!r} is not a strptime format: {str(exc).splitlines()[0]}"
            ) from None
        return value

    @property
    def duckdb_zone(self) -> str:
        """The zone as DuckDB's (ICU's) TimeZone setting names it: offsets as 'GMT+05:30'."""
        return f"GMT{self.naive_zone}" if self.naive_zone[0] in "+-" else self.naive_zone

    @model_validator(mode="after")
    def _ordered(self) -> TimestampSettings:
        if self.max is not None and _utc(self.min) >= _utc(self.max):
            raise ValueError(f"timestamps.min ({self.min}) must be before timestamps.max ({self.max})")
        return self


_OFFSET = re.compile(r"(?:UTC|GMT)?([+-])(\d{1,2})(?::?(\d{2}))?", re.IGNORECASE)


def normalise_zone(value: str) -> str:
    """'UTC' for UTC (also 'Z', 'utc', '+00:00'); a fixed offset as '+HH:MM'; an IANA name as given,
    checked against the time zone database. Raises ValueError naming the value otherwise."""
    text = value.strip()
    if text.upper() in ("UTC", "Z", "GMT", "ETC/UTC"):
        return "UTC"
    if m := _OFFSET.fullmatch(text):
        sign, hours, minutes = m[1], int(m[2]), int(m[3] or 0)
        if hours > 14 or minutes > 59:
            raise ValueError(f"naive_zone {value!r}: an offset is at most +/-14:00")
        return "UTC" if hours == minutes == 0 else f"{sign}{hours:02d}:{minutes:02d}"
    try:
        zoneinfo.ZoneInfo(text)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"naive_zone {value!r} is not a time zone: use an IANA name (e.g. 'Europe/Berlin'), an offset "
            "(e.g. '+05:30') or 'UTC'"
        ) from None
    return text


def _utc(value: datetime) -> datetime:
    """A naive datetime is UTC; an aware one is converted to UTC."""
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


# The generic source's column names (what `ingest.columns` maps a file's own names to).
ITEM_FIELDS = ("item_id", "domain", "title", "brand", "categories", "price", "description")
INTERACTION_FIELDS = ("user_id", "item_id", "domain", "timestamp", "position", "rating")


class ColumnMap(BaseModel):
    """generic: the file's own column for a column of the source, where the names differ
    (`interactions: {user_id: customer_id, timestamp: event_time}`); columns not named keep theirs."""

    model_config = ConfigDict(extra="forbid")
    items: dict[str, str] = Field(
        default_factory=dict,
        description="The items file's column for each of: " + ", ".join(ITEM_FIELDS) + " (where it differs).",
    )
    interactions: dict[str, str] = Field(
        default_factory=dict,
        description="The interactions file's column for each of: "
        + ", ".join(INTERACTION_FIELDS)
        + " (where it differs).",
    )

    @model_validator(mode="after")
    def _known_and_distinct(self) -> ColumnMap:
        for kind, fields, mapping in (
            ("items", ITEM_FIELDS, self.items),
            ("interactions", INTERACTION_FIELDS, self.interactions),
        ):
            if unknown := sorted(set(mapping) - set(fields)):
                raise ValueError(
                    f"ingest.columns.{kind}: unknown column(s) {unknown}; the generic source's {kind} "
                    f"columns are {list(fields)} (map each to the file's own name: user_id: customer_id)"
                )
            if empty := sorted(k for k, v in mapping.items() if not v.strip()):
                raise ValueError(f"ingest.columns.{kind}: no file column given for {empty}")
            if len(set(mapping.values())) != len(mapping):
                raise ValueError(f"ingest.columns.{kind}: two columns map to the same file column: {mapping}")
        return self


class IngestSettings(StageSettings):
    model_config = ConfigDict(extra="forbid")
    # The files' content is hashed as the stage's inputs; their paths do not matter.
    not_hashed: ClassVar[frozenset[str]] = frozenset(
        {"items", "interactions", "amazon", "memory_limit", "spill_dir"}
    )
    hashed_since: ClassVar[Mapping[str, Any]] = {
        "columns": {"items": {}, "interactions": {}},  # 2026-12-07
        "timestamps.format": None,  # 2026-12-08
    }

    source: SourceKind = Field(
        default="generic",
        description="Input format: generic (`items` and `interactions` CSV/JSONL/Parquet files, mapped by "
        "`columns`) or amazon2018 / amazon2023 (review and metadata files per domain, `amazon`).",
    )
    items: Path | None = Field(default=None, description="generic: the items file.")
    interactions: Path | None = Field(default=None, description="generic: the interactions file.")
    columns: ColumnMap = Field(
        default_factory=ColumnMap,
        description="generic: the files' own column names where they differ from the source's "
        '(docs/ingest.md, "Sources").',
    )
    amazon: dict[str, AmazonDomainFiles] = Field(
        default_factory=dict, description="amazon2018/amazon2023: per domain name, its reviews and meta."
    )
    domains: list[str] | None = Field(
        default=None,
        description="Domains in id-space order; None = the domains of the catalogue, sorted by name.",
    )
    time_window: TimeWindow = Field(default_factory=TimeWindow)
    kcore: KCoreSettings = Field(default_factory=KCoreSettings)
    min_interactions: int = Field(default=3, ge=3, description="Users with fewer interactions are dropped.")
    timestamps: TimestampSettings = Field(default_factory=TimestampSettings)
    max_quarantined_fraction: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description=(
            "A raw file with more than this share of its rows quarantined stops the run with the file "
            "named (it is probably not what it claims to be); 1.0 = never."
        ),
    )
    items_without_interactions: Literal["keep", "drop"] = Field(
        default="keep",
        description=(
            "Catalogue items no interaction names (new items): keep them (served from their text by the "
            "LLM models, counted in the accounting as kept without interactions) or drop them (filtered "
            "as no_interactions). Items whose interactions were all filtered by a rule are dropped either way."
        ),
    )

    memory_limit: str | None = Field(
        default=None,
        pattern=r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$",
        description="DuckDB's memory for the checks, the k-core, the id maps and the splits (e.g. '2GB'); "
        "past it DuckDB spills to `spill_dir` instead of failing. None = DuckDB's default (80% of RAM).",
    )
    spill_dir: Path | None = Field(
        default=None,
        description="Where DuckDB spills past `memory_limit` (its temp_directory); None = a temporary "
        "folder, removed after the run.",
    )

    @model_validator(mode="after")
    def _files_match_source(self) -> IngestSettings:
        if self.source != "generic" and (self.items or self.interactions) and not self.amazon:
            raise ValueError(
                f"source {self.source!r} reads ingest.amazon.<domain>.reviews/meta, not items/interactions"
            )
        if self.source != "generic" and (self.columns.items or self.columns.interactions):
            raise ValueError(
                f"ingest.columns maps the generic source's files; source {self.source!r} has its own"
            )
        if self.domains is not None and len(set(self.domains)) != len(self.domains):
            raise ValueError(f"ingest.domains has duplicates: {self.domains}")
        return self

    @property
    def kcore_enabled(self) -> bool:
        return self.kcore.enabled if self.kcore.enabled is not None else self.source != "generic"
