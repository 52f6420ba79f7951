"""The night report: one self-contained HTML page (inline SVG plots, inline CSS, no script, no network)
per night in WORKSPACE/reports/<night_id>.html, built from the night records (record.py).

Sections: the night at a glance (status, run, gate), model quality across nights against the popularity
floor, the lists (coverage, concentration, churn), the data checks, enrich and train costs, example users
with profile and lists.
"""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from bridgerec.runtime.logs import DETAIL, get_logger
from bridgerec.storage.files import atomic_path
from bridgerec.tasks.report import plots
from bridgerec.tasks.report.record import select_nights
from bridgerec.tasks.report.settings import ReportSettings

REPORTS_DIR = "reports"

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       max-width: 1180px; margin: 24px auto; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px;
     border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
.status-completed { color: #1a7f37; } .status-failed { color: #cf222e; }
.muted { color: #59636e; } code { font-size: 12px; background: #f6f8fa; padding: 1px 4px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border-bottom: 1px solid #d0d7de; padding: 3px 10px 3px 0; text-align: left; vertical-align: top; }
td.n, th.n { text-align: right; }
figure.plot { margin: 8px 0 16px; } figure.plot svg { max-width: 100%; height: auto; }
figcaption { color: #59636e; font-size: 12px; }
.user { border: 1px solid #d0d7de; border-radius: 6px; padding: 8px 14px; margin: 12px 0; }
.lists { display: flex; flex-wrap: wrap; gap: 24px; }
"""


def _n(value: Any, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}"
    return f"{value:,.0f}" if isinstance(value, int | float) else escape(str(value))


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _table(head: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:  # type: ignore[assignment]
    th = "".join(f'<th class="{"n" if i in numeric else ""}">{escape(h)}</th>' for i, h in enumerate(head))
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{"n" if i in numeric else ""}">{c}</td>' for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _plot(name: str, svg: str | None, caption: str, missing: str) -> str:
    if svg is None:
        return f'<p class="muted">{escape(missing)}</p>'
    return f'<figure class="plot" id="plot-{name}">{svg}<figcaption>{escape(caption)}</figcaption></figure>'


def _head(record: dict) -> str:
    status = record.get("status", "unknown")
    gate = record.get("gate") or {}
    train = (record.get("stages") or {}).get("train") or {}
    lines = [
        f"<h1>bridgerec night of {escape((record.get('started_at') or '')[:16].replace('T', ' '))} UTC: "
        f'<span class="status-{escape(status)}">{escape(status)}</span></h1>',
        f'<p class="muted">night <code>{escape(record["night_id"])}</code>; workspace '
        f"<code>{escape(record.get('workspace', ''))}</code>; warehouse <code>{escape(record.get('warehouse', ''))}</code></p>",
        "<ul>",
    ]
    if train.get("run_id"):
        lines.append(
            f"<li>tonight's run <code>{escape(train['run_id'])}</code> ({escape(str(train.get('model')))}, "
            f"{escape(str(train.get('init') or 'cold'))} start)</li>"
        )
    if gate:
        lines.append(
            f"<li>quality gate: <b>{escape(gate.get('decision', ''))}</b>: {escape(gate.get('message', ''))}</li>"
        )
    if record.get("message"):
        lines.append(f"<li>failed: {escape(record['message'])}</li>")
    lines.append(
        f"<li>serving: run <code>{escape(str(record.get('published_run_id') or 'none'))}</code></li>"
    )
    lines.append("</ul>")
    return "\n".join(lines)


def _item_name(record: dict, domain: str, item_id: Any) -> str:
    """An item as the concentration plot beside the table names it (its title, from tonight's top items),
    with its id; the id alone when the title is not among the figures."""
    top = ((record.get("figures") or {}).get("top_items") or {}).get(domain) or []
    title = next((t.get("title") for t in top if t.get("item_id") == item_id), None)
    return (
        f'{escape(str(title))} <span class="muted">{escape(str(item_id))}</span>'
        if title
        else escape(str(item_id))
    )


def _lists_section(record: dict, trend: list[dict]) -> str:
    missing = (record.get("figures") or {}).get("missing") or {}
    parts = ["<h2>Lists: coverage, concentration, churn</h2>"]
    parts.append(
        _plot(
            "coverage",
            plots.coverage(trend),
            "Share of each domain's catalogue recommended to anyone, and the share of all list slots "
            "taken by the 10 most recommended items, per published night.",
            "No published lists yet.",
        )
    )
    parts.append(
        _plot(
            "concentration",
            plots.concentration(record),
            "Tonight's serving lists: the most recommended items and the share of users whose list holds them.",
            f"No lists to show: {missing.get('top_items', 'nothing published')}.",
        )
    )
    parts.append(
        _plot(
            "churn",
            plots.churn(record),
            "Tonight against the previously published run: users by the share of their list that changed "
            "(0% = the same items, 100% = all new).",
            "No churn tonight: "
            + (missing.get("churn_histogram") or "the first published run has nothing to compare with")
            + ".",
        )
    )
    rows = [
        [
            escape(r["domain"]),
            _n(r.get("users")),
            _pct(r.get("coverage")),
            f"{_item_name(record, r['domain'], r.get('top_item_id'))} ({_pct(r.get('top_item_share'))})",
            _pct(r.get("top10_slot_share")),
            _pct(r.get("mean_changed")),
            _pct(r.get("p50_changed")),
            _pct(r.get("p90_changed")),
        ]
        for r in record.get("list_stability") or []
    ]
    if rows:
        head = [
            "domain",
            "users",
            "coverage",
            "top item (share of lists)",
            "top-10 share of slots",
            "mean churn",
            "median churn",
            "p90 churn",
        ]
        parts.append(_table(head, rows, {1, 2, 4, 5, 6, 7}))
    return "\n".join(parts)


def _data_section(record: dict, trend: list[dict]) -> str:
    checks = record.get("data_checks") or {}
    parts = ["<h2>Data checks</h2>", f"<p>{escape(checks.get('message', 'no data checks tonight'))}</p>"]
    rows = [
        [
            escape(r["domain"]),
            escape(r["entity"]),
            _n(r["count"]),
            _n(r.get("previous")),
            _n(r.get("new")),
            _n(r.get("gone")),
            _pct(r.get("change")),
        ]
        for r in checks.get("rows") or []
    ]
    if rows:
        parts.append(
            _table(
                ["domain", "what", "tonight", "last night", "new", "gone", "change"], rows, {2, 3, 4, 5, 6}
            )
        )
    parts.append(
        _plot(
            "data",
            plots.data(trend),
            "Interactions, users and items per domain, per night.",
            "No data checks kept.",
        )
    )
    return "\n".join(parts)


def _costs_section(record: dict, trend: list[dict]) -> str:
    stages, wall = record.get("stages") or {}, record.get("seconds") or {}
    enrich, train = stages.get("enrich") or {}, stages.get("train") or {}
    parts = [
        "<h2>Costs</h2>",
        _plot("costs", plots.costs(trend), "Wall seconds per stage, per night.", "No timings kept."),
    ]
    rows = []
    if enrich:
        engines = (
            ", ".join(f"{e['runner']} {e['seconds']} s" for e in enrich.get("engines_started") or [])
            or "none"
        )
        rows.append(
            [
                "enrich",
                _n(wall.get("enrich"), 1),
                _n(enrich.get("seconds"), 1),
                f"{_n(enrich.get('items_embedded'))} items embedded ({_n(enrich.get('items_cached'))} cached); "
                f"{_n(enrich.get('profiles_generated'))} profiles generated ({_n(enrich.get('profiles_cached'))} "
                f"cached), {_n(enrich.get('tokens_generated'))} tokens; engine starts: {escape(engines)}"
                + (" (skipped: unchanged)" if enrich.get("skipped") else ""),
            ]
        )
    if train:
        rows.append(
            [
                "train",
                _n(wall.get("train"), 1),
                _n(train.get("seconds"), 1),
                f"{escape(str(train.get('model')))}, {escape(str(train.get('init') or 'cold'))} start, "
                f"best epoch {_n(train.get('best_epoch'))} of {_n(train.get('epochs'))}, "
                f"{_n(train.get('epoch_seconds'), 1)} s per epoch"
                + (" (skipped: already trained)" if train.get("skipped") else ""),
            ]
        )
    if rows:
        header = ["stage", "wall seconds", "stage seconds", "work"]
        parts.append(_table(header, rows, {1, 2}))
        parts.append(
            "<p>Wall seconds are the night's step, as in its summary and the plot above; they add to the "
            "stage seconds what comes before and after the stage's own work (the flow's task start, "
            "reading the settings and the workspace, a packaged model's one-time conversion).</p>"
        )
    return "\n".join(parts)


def _because(r: dict) -> str:
    """The history item closest to a recommended one in the model's text space, that cosine, and its
    percentile among the domain's reference items (tasks/publish/explain.py; absent in older runs)."""
    if not r.get("because_item_id"):
        return ""
    percentile = r.get("because_percentile")
    closer = f", closer than {percentile:.0f} %" if percentile is not None else ""
    return f"{escape(r.get('because_title') or r['because_item_id'])} ({r['because_score']:.2f}{closer})"


def _examples_section(record: dict) -> str:
    figures = record.get("figures") or {}
    examples = figures.get("examples")
    parts = ["<h2>Example users</h2>"]
    if not examples:
        reason = (figures.get("missing") or {}).get("examples", "no users with lists")
        return parts[0] + f'<p class="muted">No examples: {escape(reason)}.</p>'
    for u in examples:
        parts.append('<div class="user">')
        parts.append(
            f"<h3>user <code>{escape(u['user_id'])}</code> <span class='muted'>(run {escape(u['run_id'])})</span></h3>"
        )
        parts.append(f"<p><b>profile:</b> {escape(u.get('profile') or '(no LLM profile)')}</p>")
        if u.get("interests"):
            parts.append("<ul>" + "".join(f"<li>{escape(i)}</li>" for i in u["interests"]) + "</ul>")
        if u.get("history"):
            parts.append(
                "<p><b>recently:</b> "
                + "; ".join(
                    f"{escape(h['title'] or h['item_id'])} <span class='muted'>({escape(h['domain'])})</span>"
                    for h in u["history"]
                )
                + "</p>"
            )
        parts.append('<div class="lists">')
        explained = any(r.get("because_item_id") for rows in u["recommendations"].values() for r in rows)
        for domain, rows in u["recommendations"].items():
            table = _table(
                [
                    "#",
                    "item",
                    "score",
                    *(["because you had (cosine, closer than N % of the domain)"] if explained else []),
                ],
                [
                    [
                        _n(r["rank"]),
                        escape(r.get("title") or r["item_id"]),
                        f"{r['score']:.3f}",
                        *([_because(r)] if explained else []),
                    ]
                    for r in rows
                ],
                {0, 2},
            )
            parts.append(f"<div><b>{escape(domain)}</b>{table}</div>")
        parts.append("</div>")
        if not explained:
            parts.append(
                "<p class='muted'>No explanations: "
                + (
                    "pop lists the most popular items; popularity is their reason."
                    if u.get("model") == "pop"
                    else "this run's model has no text space (or publish.explain is off)."
                )
                + "</p>"
            )
        parts.append("</div>")
    return "\n".join(parts)


def render(record: dict, trend: list[dict]) -> str:
    """The page of `record`, with trends over `trend` (oldest first, ending with `record`)."""
    missing = (record.get("figures") or {}).get("missing") or {}
    quality = _plot(
        "quality",
        plots.quality(trend),
        "Validation NDCG@10 (full ranking over the domain) of each night's run, marked by the quality gate's "
        "decision, against the popularity list's (dashed): a model is better only above the floor.",
        f"No validation figures: {missing.get('valid_by_domain', 'no run trained')}.",
    )
    body = [
        _head(record),
        f"<h2>Model quality over the last {len(trend)} night{'s' if len(trend) != 1 else ''}</h2>",
        quality,
        _lists_section(record, trend),
        _data_section(record, trend),
        _costs_section(record, trend),
        _examples_section(record),
        f'<p class="muted">Built {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by bridgerec from '
        f"<code>nights/{escape(record['night_id'])}.json</code>; rebuild it with "
        f"<code>bridgerec report --night {escape(record['night_id'])}</code>.</p>",
    ]
    title = f"bridgerec night {escape(record['night_id'])}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def report_path(workspace: Path, night_id: str) -> Path:
    return Path(workspace) / REPORTS_DIR / f"{night_id}.html"


def build_report(
    workspace: Path, night_id: str | None = None, settings: ReportSettings | None = None
) -> Path:
    """Write the report of night `night_id` (default: the newest kept) and return its path. Raises
    ReportMissing when there is no such night record."""
    settings = settings or ReportSettings()
    record, trend = select_nights(workspace, night_id, settings.nights)
    path = report_path(workspace, record["night_id"])
    with atomic_path(path) as tmp:
        tmp.write_text(render(record, trend), encoding="utf-8")
    pages = sorted(path.parent.glob("*.html"), key=lambda p: (p.stat().st_mtime, p.name))
    for old in pages[: max(len(pages) - settings.keep, 0)]:
        old.unlink(missing_ok=True)
    get_logger().info("report: %s", path, extra=DETAIL)
    return path
