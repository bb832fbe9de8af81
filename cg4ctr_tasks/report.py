"""The HTML report: what each round kept, and whether CTR went up.

One self-contained file (images and plots inlined) per workspace, ``data/report.html``, plus a
copy of each round's section as ``data/rounds/round-NNN/report.html``: per round, each item's
original creative beside the kept candidates per user group with their scores and captions;
plots of true CTR (simulated world) and reward metrics per round; the params used. It also
writes ``data/metrics/rounds.csv``, the table behind ``dvc plots show``.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from typing import Any

import pandas as pd

from cg4ctr_tasks import storage
from cg4ctr_tasks.errors import RejectedInput
from cg4ctr_tasks.workspace import Workspace, round_name

MAX_ITEMS_SHOWN = 8  # items per round in the image grid; the tables cover all of them


@dataclass(frozen=True)
class ReportResult:
    path: str
    rounds: int
    metrics_table: str

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _rounds(ws: Workspace) -> list[int]:
    fs, root = storage.url_to_fs(storage.join(ws.data, "rounds"))
    if not fs.exists(root):
        return []
    found = []
    for path in fs.ls(root, detail=False):
        name = str(path).rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("round-") and name[6:].isdigit():
            found.append(int(name[6:]))
    return sorted(found)


def _read_json(url: str) -> dict[str, Any] | None:
    if not storage.exists(url):
        return None
    loaded: dict[str, Any] = json.loads(storage.read_bytes(url))
    return loaded


def _read_table(url: str) -> pd.DataFrame | None:
    return storage.read_parquet(url) if storage.exists(url) else None


def metrics_table(ws: Workspace) -> pd.DataFrame:
    """One row per round: true CTR (when measured), uplift over round 0, what was kept."""
    rows = []
    for round_id in _rounds(ws):
        metrics = _read_json(storage.join(ws.round_dir(round_id), "metrics.json"))
        if metrics is None:
            continue
        row: dict[str, Any] = {"round": round_id, "mode": metrics.get("mode", "bootstrap")}
        row["true_ctr"] = metrics.get("true_ctr")
        for group, value in sorted((metrics.get("true_ctr_per_group") or {}).items()):
            row[f"true_ctr_{group}"] = value
        row["logged_ctr"] = metrics.get("logged_ctr")
        rows.append(row)
    table = pd.DataFrame(rows)
    if not table.empty and (table["round"] == 0).any() and table["true_ctr"].notna().any():
        base = float(table.loc[table["round"] == 0, "true_ctr"].iloc[0])
        table["uplift"] = table["true_ctr"] / base - 1.0
    return table


def _img(ws: Workspace, uri: str, title: str) -> str:
    limits = ws.params.storage
    try:
        data = storage.read_bytes(ws.resolve(uri), max_bytes=limits.max_image_bytes)
        storage.decode_image(data, uri, limits.max_image_pixels)
    except (RejectedInput, FileNotFoundError) as exc:
        return f'<span class="missing" title="{html.escape(str(exc))}">missing</span>'
    encoded = base64.b64encode(data).decode()
    return (
        f'<figure><img src="data:image/png;base64,{encoded}" alt="{html.escape(title)}">'
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
    )


def _plot(table: pd.DataFrame) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in table.columns if c.startswith("true_ctr") or c == "logged_ctr"]
    if table.empty or not columns:
        return "<p>No per-round metrics yet.</p>"
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for column in columns:
        style = "-o" if column == "true_ctr" else "--"
        ax.plot(table["round"], table[column], style, label=column)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("CTR")
    ax.set_title("CTR per round (round 0: the initial creatives)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    sink = io.BytesIO()
    fig.savefig(sink, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    encoded = base64.b64encode(sink.getvalue()).decode()
    return f'<img alt="CTR per round" src="data:image/png;base64,{encoded}">'


def _round_section(ws: Workspace, round_id: int, originals: pd.DataFrame) -> str:
    round_dir = ws.round_dir(round_id)
    partition = _read_table(storage.join(round_dir, "partition.parquet"))
    candidates = _read_table(storage.join(round_dir, "candidates.parquet"))
    captions = _read_table(storage.join(round_dir, "captions.parquet"))
    metrics = _read_json(storage.join(round_dir, "metrics.json")) or {}
    head = f"<h2 id='{round_name(round_id)}'>Round {round_id}</h2>"
    facts = ", ".join(f"{k}: {v}" for k, v in metrics.items() if not isinstance(v, dict))
    head += f"<p>{html.escape(facts)}</p>"
    if partition is None or candidates is None:
        return head + "<p>No partition yet.</p>"
    kept = partition[partition["kept"]].merge(
        candidates[["candidate_id", "image_uri"]], on="candidate_id", how="left"
    )
    if captions is not None:
        kept = kept.merge(captions[["candidate_id", "caption"]], on="candidate_id", how="left")
    else:
        kept["caption"] = ""
    rows = []
    for item_id in sorted(kept["item_id"].unique())[:MAX_ITEMS_SHOWN]:
        original = originals[originals["item_id"] == item_id]
        cells = [_img(ws, str(original["image_uri"].iloc[0]), "original")] if len(original) else []
        for group, block in kept[kept["item_id"] == item_id].groupby("user_group"):
            cells.append(f"<span class='group'>{html.escape(str(group))}</span>")
            for rec in block.sort_values("rank").to_dict("records"):
                label = f"{rec['score']:.4f} {rec.get('caption') or ''}"
                cells.append(_img(ws, str(rec["image_uri"]), label))
        rows.append(f"<div class='row'><b>{html.escape(item_id)}</b>{''.join(cells)}</div>")
    return head + "".join(rows)


STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
.row{display:flex;flex-wrap:wrap;align-items:center;gap:6px;margin:6px 0}
figure{margin:0;text-align:center;font-size:9px;width:80px}img{image-rendering:pixelated}
figure img{width:72px;height:72px}.group{font-weight:bold;margin-left:10px}
.missing{color:#b00;font-size:10px}
"""


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


def write_report(ws: Workspace) -> ReportResult:
    """Write data/report.html, per-round report.html files and data/metrics/rounds.csv."""
    table = metrics_table(ws)
    csv_path = storage.join(ws.data, "metrics", "rounds.csv")
    storage.write_text(csv_path, table.to_csv(index=False))
    summary = {round_name(int(r["round"])): r for r in json.loads(table.to_json(orient="records"))}
    storage.write_text(
        storage.join(ws.data, "metrics", "summary.json"), json.dumps(summary, indent=2)
    )
    originals = storage.read_parquet(ws.creatives_table).sort_values("creative_id")
    sections = []
    for round_id in _rounds(ws):
        if round_id == 0:
            continue
        section = _round_section(ws, round_id, originals)
        storage.write_text(
            storage.join(ws.round_dir(round_id), "report.html"),
            _page(f"cg4ctr {round_name(round_id)}", section),
        )
        sections.append(section)
    params_json = json.dumps(ws.params.model_dump(exclude={"profiles"}), indent=2)
    body = (
        "<h2>CTR per round</h2>"
        + (table.to_html(index=False, float_format=lambda v: f"{v:.5f}") if not table.empty else "")
        + _plot(table)
        + "".join(sections)
        + f"<h2>Parameters</h2><details><summary>params ({html.escape(ws.params.profile)})"
        + f"</summary><pre>{html.escape(params_json)}</pre></details>"
    )
    path = storage.join(ws.data, "report.html")
    storage.write_text(path, _page(f"cg4ctr report: {ws.root.name}", body))
    return ReportResult(path=path, rounds=len(sections), metrics_table=csv_path)
