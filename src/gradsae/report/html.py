"""One self-contained HTML page from a run's saved files: ``report.html``.

The page is built from JSON-shaped data only (``results.json``, ``examples.json``,
``cards_layer{l}.json``, the PNGs the report wrote), never from live objects, and
needs nothing but itself: CSS and JS inline, plots as ``data:`` URIs, no fonts, no
CDN, no request of any kind. Three views:

* Overview: the run's config, ``table.md``'s tables as HTML tables (the same
  numbers: the markdown is converted, not recomputed), the plots, and the
  deletion / sufficiency curves when a layer has them.
* Examples: a select chooses the ranking (GradSAE by default; any method of the run:
  activation, random, ig, relp, the activation controls, ablation). The example's
  TopK under it (beside the activation TopK, or GradSAE's when activation is chosen),
  and its tokens coloured by one latent's per-token score under it: GradSAE's
  influence ``g[n, c] = H[n, c] * dY/dH[n, c]`` (red raises ``Y``, blue lowers it), the
  ``ig`` / ``relp`` attribution, the activation ``H[n, c]`` for the activation rankings
  (GradSAE's influence for ``random`` and ``ablation``, which have none per token) or,
  toggled, the activation; its answer, and the answer under each masking condition.
* Latents: every latent of some TopK set, sortable by influence, activation, the
  chosen ranking's score and density, filterable by the set it was in, searchable
  by id; a click opens its feature card (:mod:`gradsae.experiments.cards`).

Files written before every ranking was kept (GradSAE and activation only) render the same way.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from gradsae import _files
from gradsae.experiments.results import EXAMPLES, CardSet, ExampleDump, LayerExamples, RunResults, cards_path
from gradsae.report.tables import table_markdown

REPORT = "report.html"


# -- data --------------------------------------------------------------------------------
def latent_rows(part: dict[str, Any], cards: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per latent of some TopK set of ``part`` (a :class:`LayerExamples` as JSON), for the latent table.

    ``gradsae`` / ``activation``: the ids of the examples whose GradSAE / activation TopK holds it;
    ``in_top``: the same for every ranking method (``method -> ids``); ``influence`` / ``activation``:
    the mean over the examples whose TopK holds the latent of its GradSAE score / mean activation
    there; ``scores``: that mean of its score under each method (files that kept it); ``density`` and
    ``max_act`` come from its card (``None`` without one).
    """
    rows: dict[int, dict[str, Any]] = {}
    for ex in part["examples"]:
        traced = {t["latent"]: t for t in ex["traces"]}
        for method, top in ex["top"].items():
            for latent, _ in top:
                row = rows.setdefault(latent, {"latent": latent, "gradsae": [], "activation": [], "_seen": {}})
                row.setdefault("in_top", {}).setdefault(method, []).append(ex["id"])
                if method in ("gradsae", "activation"):
                    row[method].append(ex["id"])
                row["_seen"][ex["id"]] = traced.get(latent)
    by_card = {c["latent"]: c for c in (cards or {}).get("cards", [])}
    return [_row(row, by_card.get(latent)) for latent, row in sorted(rows.items())]


def _row(row: dict[str, Any], card: dict[str, Any] | None) -> dict[str, Any]:
    seen = [t for t in row.pop("_seen").values() if t is not None]
    methods = dict.fromkeys(m for t in seen for m in t.get("scores", {}))
    return {
        **row,
        "scores": {m: sum(t["scores"].get(m, 0.0) for t in seen) / max(1, len(seen)) for m in methods},
        "influence": sum(t["gradsae"] for t in seen) / max(1, len(seen)),
        "activation_mean": sum(t["mean_activation"] for t in seen) / max(1, len(seen)),
        "density": None if card is None else card["density"],
        "max_act": None if card is None else card["max_activation"],
    }


def layer_data(part: LayerExamples | dict[str, Any], cards: CardSet | dict[str, Any] | None) -> dict[str, Any]:
    """What the page's script needs for one layer: examples, latent rows, cards by latent."""
    part_json = _json(part)
    cards_json = _json(cards) if cards is not None else None
    return {
        "layer": part_json["layer"],
        "methods": ranking_methods(part_json),
        "examples": part_json["examples"],
        "latents": latent_rows(part_json, cards_json),
        "cards": {str(c["latent"]): c for c in (cards_json or {}).get("cards", [])},
        "cards_meta": {k: v for k, v in (cards_json or {}).items() if k != "cards"},
    }


def ranking_methods(part: dict[str, Any]) -> list[str]:
    """The ranking methods whose TopK the examples of ``part`` keep, GradSAE first, then in the run's order."""
    found = dict.fromkeys(m for ex in part["examples"] for m in ex["top"])
    return sorted(found, key=lambda m: (m != "gradsae", list(found).index(m)))


def _json(value: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return dict(value)


# -- pages ---------------------------------------------------------------------------------
def run_page(folder: str | Path, results: RunResults, *, images: Iterable[Path] = ()) -> str:
    """The report of a run folder: its results, examples, cards and ``images`` (PNG files)."""
    folder = Path(folder)
    dump = ExampleDump.load(folder) if (folder / EXAMPLES).is_file() else None
    layers = []
    for result in results.layers:
        part = dump.layer(result.layer) if dump else None
        path = cards_path(folder, result.layer)
        cards = CardSet.load(path) if path.is_file() else None
        if part is not None:
            layers.append(layer_data(part, cards))
    meta = dataclasses.asdict(results.config)
    overview = [
        markdown_html(table_markdown(results.layers, results.config)),
        _config_table(meta),
        *(_curves(r.layer, getattr(r, "curves", None)) for r in results.layers),
        _figures(images),
    ]
    notes = [] if dump else [f"No {EXAMPLES} in this run folder: rerun `gradsae reproduce` for the example view."]
    title = f"GradSAE report: {meta['task']}, {meta['model']}"
    return page(title, "\n".join(overview), {"layers": layers, "notes": notes, "run": str(folder)})


def write_run_page(folder: str | Path, results: RunResults, *, images: Iterable[Path] = ()) -> Path:
    """Write ``<folder>/report.html``."""
    return _files.write_text(Path(folder) / REPORT, run_page(folder, results, images=images))


def score_page(title: str, summary_markdown: str, part: dict[str, Any], cards: dict[str, Any] | None = None) -> str:
    """The page of ``gradsae score --html``: one prompt (``part``: a :class:`LayerExamples` as JSON)."""
    return page(title, markdown_html(summary_markdown), {"layers": [layer_data(part, cards)], "notes": []})


def page(title: str, overview_html: str, data: dict[str, Any]) -> str:
    """The whole document: inline CSS, the overview, the data as JSON, inline JS."""
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False)
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    template, css, js = (_asset(name) for name in ("report.html", "report.css", "report.js"))
    return template.format(title=html.escape(title), css=css, overview=overview_html, data=payload, js=js)


def _asset(name: str) -> str:
    """A file of ``gradsae/report/assets`` (the page's template, CSS and script)."""
    return (resources.files("gradsae.report") / "assets" / name).read_text(encoding="utf-8")


# -- overview pieces ------------------------------------------------------------------------
def _config_table(meta: dict[str, Any]) -> str:
    rows = []
    for key, value in meta.items():
        shown = ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else value
        shown = ", ".join(map(str, shown)) if isinstance(shown, list | tuple) else shown
        rows.append(f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(shown))}</td></tr>")
    brief = ", ".join(f"{k} {meta[k]}" for k in ("task", "model", "n", "seed", "mode") if k in meta)
    table = '<table class="config">' + "".join(rows) + "</table>"
    return f"<details><summary><b>Run configuration</b>: {html.escape(brief)}</summary>{table}</details>"


def _figures(images: Iterable[Path]) -> str:
    parts = []
    for path in images:
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        name = html.escape(Path(path).name)
        parts.append(
            f'<figure><img alt="{name}" src="data:image/png;base64,{data}"><figcaption>{name}</figcaption></figure>'
        )
    return '<h2>Plots</h2>\n<div class="figures">' + "".join(parts) + "</div>" if parts else ""


def _curves(layer: int, curves: Any) -> str:
    """Deletion / sufficiency curves of a layer as inline SVG (a name -> y values or {x, y} mapping)."""
    if not curves:
        return ""
    series = _series(curves)
    head = f"<h2>Curves, layer {layer}</h2>\n"
    if not series:
        return head + f"<pre>{html.escape(json.dumps(curves, indent=1, default=str)[:4000])}</pre>"
    return head + svg_lines(series)


def _series(curves: Any) -> dict[str, list[tuple[float, float]]]:
    """``{name: [(x, y), ...]}`` from a mapping of lists, of ``{"x": [...], "y": [...]}``, or of ``[x, y]`` pairs."""
    if dataclasses.is_dataclass(curves) and not isinstance(curves, type):
        curves = dataclasses.asdict(curves)
    if not isinstance(curves, dict):
        return {}
    out = {}
    for name, value in curves.items():
        if isinstance(value, dict) and isinstance(value.get("y"), list):
            xs = value.get("x") or list(range(len(value["y"])))
            points = list(zip(xs, value["y"], strict=False))
        elif isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
            points = list(enumerate(value))
        elif isinstance(value, list) and value and all(isinstance(v, list | tuple) and len(v) == 2 for v in value):
            points = [(v[0], v[1]) for v in value]
        else:
            continue
        if all(isinstance(x, int | float) and isinstance(y, int | float) for x, y in points):
            out[str(name)] = [(float(x), float(y)) for x, y in points]
    return out


def svg_lines(series: dict[str, list[tuple[float, float]]], width: int = 520, height: int = 240) -> str:
    """A small line chart, one polyline per series, with a legend."""
    points = [p for line in series.values() for p in line]
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(0.0, min(p[1] for p in points)), max(p[1] for p in points)
    sx = (width - 60) / ((x1 - x0) or 1)
    sy = (height - 40) / ((y1 - y0) or 1)
    colors = ["#d62728", "#1f77b4", "#7f7f7f", "#2ca02c", "#9467bd", "#ff7f0e"]
    lines, legend = [], []
    for i, (name, line) in enumerate(series.items()):
        color = colors[i % len(colors)]
        path = " ".join(f"{50 + (x - x0) * sx:.1f},{height - 30 - (y - y0) * sy:.1f}" for x, y in line)
        lines.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        legend.append(
            f'<text x="{width - 150}" y="{16 + 14 * i}" fill="{color}" font-size="11">{html.escape(name)}</text>'
        )
    axes = (
        f'<line x1="50" y1="{height - 30}" x2="{width - 10}" y2="{height - 30}" stroke="#999"/>'
        f'<line x1="50" y1="10" x2="50" y2="{height - 30}" stroke="#999"/>'
        f'<text x="4" y="16" font-size="10">{y1:.3g}</text><text x="4" y="{height - 30}" font-size="10">{y0:.3g}</text>'
        f'<text x="50" y="{height - 12}" font-size="10">{x0:.3g}</text>'
        f'<text x="{width - 40}" y="{height - 12}" font-size="10">{x1:.3g}</text>'
    )
    body = axes + "".join(lines) + "".join(legend)
    return f'<svg class="curves" width="{width}" height="{height}" role="img">{body}</svg>'


# -- markdown -> HTML (the subset table.md and gradsae score use) ------------------------------
def markdown_html(text: str) -> str:
    """Headings, lists, pipe tables and paragraphs; inline code and bold; everything else escaped."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            block = _take(lines, i, lambda s: s.startswith("|"))
            out.append(_table(block))
        elif line.startswith("- "):
            block = _take(lines, i, lambda s: s.startswith("- "))
            out.append("<ul>" + "".join(f"<li>{_inline(b[2:])}</li>" for b in block) + "</ul>")
        elif m := re.match(r"^(#{1,4}) (.*)", line):
            block = [line]
            level = min(len(m.group(1)) + 1, 5)
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
        elif line.strip():
            block = _take(lines, i, lambda s: bool(s.strip()) and not s.startswith(("|", "- ", "#")))
            out.append(f"<p>{_inline(' '.join(block))}</p>")
        else:
            block = [line]
        i += len(block)
    return "\n".join(out)


def _take(lines: Sequence[str], start: int, keep: Any) -> list[str]:
    end = start
    while end < len(lines) and keep(lines[end]):
        end += 1
    return list(lines[start:end])


def _table(block: Sequence[str]) -> str:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block]
    rows = [r for r in rows if not all(re.fullmatch(r":?-{3,}:?", c) for c in r)]
    if not rows:
        return ""
    head = "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _cell(text: str) -> str:
    """A table cell; ``mean [low, high]`` intervals are set smaller than the mean."""
    escaped = _inline(text)
    return re.sub(r"(\[[-+]?[\d.]+, [-+]?[\d.]+\])", r'<span class="ci">\1</span>', escaped)


def _inline(text: str) -> str:
    escaped = html.escape(text, quote=False)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", escaped)
