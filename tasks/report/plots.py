"""The report's plots, drawn with matplotlib (object API, no pyplot state) into inline SVG: the page needs
no network and no script. Each function takes night records (record.py), oldest first, and returns one
SVG document as text, or None when there is nothing to draw (the page says why instead).
"""

from __future__ import annotations

import io
import re
from typing import Any

from matplotlib import rc_context
from matplotlib.figure import Figure

STAGE_ORDER = ("ingest", "checks", "enrich", "train", "gate", "publish")
DECISION_STYLE = {  # the gate's decision -> marker, colour, label
    "passed": ("o", "#1a7f37", "published (gate passed)"),
    "first": ("o", "#1a7f37", "published (gate passed)"),
    "unchanged": ("o", "#6e7781", "unchanged run"),
    "off": ("o", "#6e7781", "gate off"),
    "refused": ("X", "#cf222e", "refused by the gate"),
}
RC: Any = {  # matplotlib rcParams for every plot here
    "svg.fonttype": "none",  # text stays text: smaller, selectable, searchable
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}


def _svg(fig: Figure) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return re.sub(r"^.*?(<svg\b)", r"\1", text, count=1, flags=re.S)  # drop the XML prolog and doctype


def _label(record: dict) -> str:
    started = record.get("started_at") or ""
    return f"{started[5:10]} {started[11:16]}" if len(started) >= 16 else record["night_id"][-6:]


def _figure(
    n_axes: int, height: float = 2.6, width: float = 4.2, sharey: bool = False
) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * n_axes, height), layout="constrained")
    axes = fig.subplots(1, n_axes, sharey=sharey, squeeze=False)[0]
    return fig, list(axes)


def _domains(records: list[dict], key: str) -> list[str]:
    names: set[str] = set()
    for r in records:
        names |= set((r.get("figures") or {}).get(key) or {})
    return sorted(names - {"overall"}) + (["overall"] if "overall" in names else [])


def quality(records: list[dict]) -> str | None:
    """Validation NDCG@10 (full ranking) per domain across nights: tonight's run, marked by the gate's
    decision, and the popularity floor (dashed)."""
    domains = _domains(records, "valid_by_domain")
    if not domains:
        return None
    with rc_context(RC):
        fig, axes = _figure(len(domains), sharey=False)
        x = list(range(len(records)))
        seen: set[str] = set()
        for ax, domain in zip(axes, domains, strict=True):
            model, pop = [], []
            for r in records:
                v = ((r.get("figures") or {}).get("valid_by_domain") or {}).get(domain) or {}
                model.append(v.get("model"))
                pop.append(v.get("popularity"))
            ax.plot(x, [float("nan") if v is None else v for v in model], color="#0969da", lw=1.5, zorder=1)
            ax.plot(
                x,
                [float("nan") if v is None else v for v in pop],
                color="#6e7781",
                ls="--",
                lw=1.2,
                marker="_",  # a dash at each night: a first night's single point has no line to draw
                markersize=14,
                label="popularity floor",
            )
            for i, r in enumerate(records):
                decision = (r.get("gate") or {}).get("decision")
                if model[i] is None or decision not in DECISION_STYLE:
                    continue
                marker, colour, label = DECISION_STYLE[decision]
                ax.scatter(
                    [i],
                    [model[i]],
                    marker=marker,
                    color=colour,
                    s=42,
                    zorder=2,
                    label=None if label in seen else label,
                )
                seen.add(label)
            ax.set_title(domain if domain != "overall" else "all domains")
            ax.set_xticks(x, [_label(r) for r in records], rotation=45, ha="right")
            ax.set_ylim(bottom=0)
        axes[0].set_ylabel("validation NDCG@10 (full ranking)")
        handles, labels = [], []
        for ax in axes:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
        return _svg(fig)


def _stability(records: list[dict]) -> dict[str, list[dict | None]]:
    """domain -> one list_stability row (or None) per night."""
    domains = sorted({row["domain"] for r in records for row in r.get("list_stability") or []})
    out: dict[str, list[dict | None]] = {d: [] for d in domains}
    for r in records:
        rows = {row["domain"]: row for row in r.get("list_stability") or []}
        for d in domains:
            out[d].append(rows.get(d))
    return out


def coverage(records: list[dict]) -> str | None:
    """Catalogue coverage and the top-10 items' share of all list slots per domain, across nights."""
    by_domain = _stability(records)
    if not by_domain:
        return None
    with rc_context(RC):
        fig, axes = _figure(len(by_domain), sharey=True)
        x = list(range(len(records)))
        for ax, (domain, rows) in zip(axes, by_domain.items(), strict=True):
            for key, label, colour in (
                ("coverage", "catalogue coverage", "#0969da"),
                ("top10_slot_share", "share of list slots held by the 10 most recommended items", "#bc4c00"),
            ):
                ys = [float("nan") if row is None or row.get(key) is None else row[key] for row in rows]
                ax.plot(x, ys, marker="o", ms=4, color=colour, label=label)
            ax.set_title(domain)
            ax.set_ylim(0, 1)
            ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
            ax.set_xticks(x, [_label(r) for r in records], rotation=45, ha="right")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=2, frameon=False)
        return _svg(fig)


def _short(text: str | None, n: int = 42) -> str:
    text = (text or "(no title)").strip()
    return text if len(text) <= n else text[: n - 1] + "…"


def concentration(record: dict) -> str | None:
    """Tonight: the share of lists holding each of the most recommended items, per domain."""
    top = (record.get("figures") or {}).get("top_items") or {}
    if not top:
        return None
    with rc_context(RC):
        n = max(len(v) for v in top.values())
        fig, axes = _figure(len(top), height=0.28 * n + 0.9, width=5.0)
        for ax, (domain, rows) in zip(axes, sorted(top.items()), strict=True):
            labels = [_short(r["title"]) for r in rows][::-1]
            shares = [r["share"] for r in rows][::-1]
            ax.barh(range(len(rows)), shares, color="#8250df")
            ax.set_yticks(range(len(rows)), labels)
            ax.set_xlim(0, 1)
            ax.xaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
            ax.set_title(f"{domain}: share of lists holding the item")
            ax.grid(axis="y", visible=False)
        return _svg(fig)


def churn(record: dict) -> str | None:
    """Tonight: users by the share of their list that changed since the previous published run."""
    hist = (record.get("figures") or {}).get("churn_histogram") or {}
    if not hist:
        return None
    with rc_context(RC):
        fig, axes = _figure(len(hist), sharey=False)
        for ax, (domain, counts) in zip(axes, sorted(hist.items()), strict=True):
            bins = len(counts)
            ax.bar([(i + 0.5) / bins for i in range(bins)], counts, width=0.9 / bins, color="#0969da")
            ax.set_xlim(0, 1)
            ax.xaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
            ax.set_xlabel("share of the user's list changed")
            ax.set_title(domain)
        axes[0].set_ylabel("users")
        return _svg(fig)


def data(records: list[dict]) -> str | None:
    """Interactions, users and items per domain across nights (the data checks' counts)."""
    series: dict[str, dict[str, list[float]]] = {}
    for i, r in enumerate(records):
        for row in (r.get("data_checks") or {}).get("rows") or []:
            ys = series.setdefault(row["entity"], {}).setdefault(row["domain"], [float("nan")] * len(records))
            ys[i] = row["count"]
    if not series:
        return None
    entities = [e for e in ("interactions", "users", "items") if e in series]
    with rc_context(RC):
        fig, axes = _figure(len(entities))
        x = list(range(len(records)))
        for ax, entity in zip(axes, entities, strict=True):
            for domain, ys in sorted(series[entity].items()):
                ax.plot(x, ys, marker="o", ms=4, label=domain)
            ax.set_title(entity)
            ax.set_ylim(bottom=0)
            ax.yaxis.set_major_formatter(lambda v, _: f"{v:,.0f}")
            ax.set_xticks(x, [_label(r) for r in records], rotation=45, ha="right")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
        return _svg(fig)


def costs(records: list[dict]) -> str | None:
    """Seconds per stage per night (stacked), the enrich and train costs in front."""
    if not any(r.get("seconds") for r in records):
        return None
    palette = {
        "ingest": "#6e7781",
        "checks": "#afb8c1",
        "enrich": "#8250df",
        "train": "#0969da",
        "gate": "#bc4c00",
        "publish": "#1a7f37",
    }
    with rc_context(RC):
        fig, (ax,) = _figure(1, width=max(4.2, 0.45 * len(records) + 2.5))
        x = list(range(len(records)))
        bottom = [0.0] * len(records)
        for stage in STAGE_ORDER:
            ys = [float((r.get("seconds") or {}).get(stage) or 0.0) for r in records]
            if any(ys):
                ax.bar(x, ys, bottom=bottom, color=palette[stage], label=stage, width=0.7)
                bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
        ax.set_ylabel("seconds")
        ax.set_xticks(x, [_label(r) for r in records], rotation=45, ha="right")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        return _svg(fig)


PLOTS: dict[str, Any] = {
    "quality": quality,
    "coverage": coverage,
    "data": data,
    "costs": costs,
}
