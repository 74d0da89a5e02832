"""report.html: self-contained, built from the files, and used in a real headless Chromium."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil

import pytest
import torch

from gradsae.cli import main
from gradsae.experiments.record import record_scores
from gradsae.experiments.results import EXAMPLES, LayerExamples
from gradsae.objectives import NextTokenProb
from gradsae.report.html import REPORT, _curves, latent_rows, layer_data, markdown_html, score_page
from gradsae.report.tables import fmt_prop
from gradsae.scores import ScoreOptions, score_methods
from tests.cdp import Browser, chromium


def _data(page: str) -> dict:
    found = re.search(r'<script type="application/json" id="gradsae-data">(.*?)</script>', page, re.S)
    assert found
    return json.loads(found.group(1))


def test_page_is_self_contained_and_carries_the_files(tiny_run):
    page = (tiny_run.folder / REPORT).read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert page.count("data:image/png;base64,") == 2  # exp1 and exp2 plots
    result = tiny_run.results.layers[0]
    assert fmt_prop(result.baseline) in page  # the table's numbers, as table.md has them
    assert '<table class="results">' in page
    data = _data(page)
    (layer,) = data["layers"]
    assert len(layer["examples"]) == result.n_kept
    assert set(layer["cards"]) == {str(c.latent) for c in tiny_run.cards.cards}
    assert layer["examples"][0]["tokens"] == list(tiny_run.dump.layers[0].examples[0].tokens)


def test_latent_rows_count_topk_membership(tiny_run):
    part = json.loads((tiny_run.folder / EXAMPLES).read_text())["layers"][0]
    rows = {r["latent"]: r for r in latent_rows(part, None)}
    for ex in tiny_run.dump.layers[0].examples:
        for method in ("gradsae", "activation"):
            for latent, _ in ex.top[method]:
                assert ex.id in rows[latent][method]
    assert all(r["density"] is None for r in rows.values())


def test_markdown_tables_and_curves():
    out = markdown_html("# Title\n\n- a `code` item\n\n| x | K=1 |\n|---|---|\n| GradSAE TopK | 50.0 [40.0, 60.0] |\n")
    assert "<h2>Title</h2>" in out and "<code>code</code>" in out
    assert "<th>K=1</th>" in out and '50.0 <span class="ci">[40.0, 60.0]</span>' in out
    assert _curves(6, None) == ""
    assert "<polyline" in _curves(6, {"deletion/gradsae": [1.0, 0.5, 0.2], "deletion/activation": [[0, 1.0], [1, 0.8]]})
    assert "<pre>" in _curves(6, {"odd": "shape"})


def test_report_command_writes_html_and_says_what_is_missing(tiny_run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(tiny_run.folder, folder, ignore=shutil.ignore_patterns(REPORT, EXAMPLES, "cards_*"))
    assert main(["report", str(folder), "--html"]) == 0
    data = _data((folder / REPORT).read_text())
    assert data["layers"] == [] and "examples.json" in data["notes"][0]


def test_score_page_for_one_prompt(tiny_run):
    tok = tiny_run.lm.tokenizer
    ids = torch.tensor([tok.encode("the lazy dog")])
    methods = ("gradsae", "activation")
    by = score_methods(
        tiny_run.lm,
        tiny_run.sae,
        ids,
        torch.ones_like(ids),
        NextTokenProb(),
        methods=methods,
        options=ScoreOptions(layer=0),
    )
    record = record_scores(tok, ids, torch.ones_like(ids), by, top=3)
    part = json.loads(json.dumps(LayerExamples(layer=0, examples=(record,)), default=lambda o: o.__dict__))
    page = score_page("score", "# gradsae score\n", part)
    assert _data(page)["layers"][0]["examples"][0]["tokens"] == ["<s>", *"the lazy dog"]


# -- in a browser -----------------------------------------------------------------------------------
@pytest.fixture
def browser(tmp_path):
    if chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium): the browser test needs it")
    pytest.importorskip("websocket", reason="websocket-client is not installed (pip install -e '.[dev]')")
    session = Browser.start(tmp_path)
    yield session
    session.close()


def _backgrounds(browser: Browser) -> list[str]:
    return browser.js("[...document.querySelectorAll('#prompt-tokens .tok')].map((s) => s.style.background)")


def test_report_in_a_browser(tiny_run, browser, tmp_path):
    """Open the page from disk, click a latent, see its card, toggle the colouring: no error, no request."""
    url = (tiny_run.folder / REPORT).as_uri()
    browser.open(url)
    assert browser.js("document.querySelectorAll('#example-list .ex-item').length") == tiny_run.results.layers[0].n_kept
    by_influence = _backgrounds(browser)
    assert any(by_influence) and browser.js("document.getElementById('prompt-tokens').dataset.colour") == "influence"

    browser.click("#colour-activation")
    assert browser.js("document.getElementById('prompt-tokens').dataset.colour") == "activation"
    by_activation = _backgrounds(browser)
    assert by_activation != by_influence and all(b == "" or "217, 119, 6" in b for b in by_activation)

    card = tiny_run.cards.cards[-1]
    browser.click("#tab-latents")
    browser.type("#latent-search", str(card.latent))
    shown = browser.js("[...document.querySelectorAll('#latent-table tr.latent-row')].map((r) => +r.dataset.latent)")
    assert card.latent in shown and all(str(c).startswith(str(card.latent)) for c in shown)
    browser.click(f'#latent-table tr.latent-row[data-latent="{card.latent}"]')
    assert browser.js("document.getElementById('card-title').textContent") == f"Latent {card.latent} \u00b7 layer 0"
    assert browser.js("document.querySelectorAll('#card .ctx').length") == len(card.top_activation) + len(
        card.top_influence
    )
    assert browser.js("document.querySelectorAll('#card svg.hist rect').length") == len(card.hist_counts)

    browser.js("document.getElementById('latent-search').value = ''")
    browser.type("#latent-search", " ")
    browser.click('#latent-table th[data-sort="density"]')
    density = browser.js(
        "[...document.querySelectorAll('#latent-table tr.latent-row td:nth-child(6)')].map((td) => td.textContent)"
    )
    known = [float(d) for d in density if d != "-"]
    assert known == sorted(known, reverse=True) and len(known) == len(tiny_run.cards.cards)

    browser.click("#tab-overview")
    assert browser.js("document.querySelectorAll('#view-overview img').length") == 2
    browser.click("#tab-examples")
    shot = browser.screenshot(tmp_path / "report.png")
    assert shot.stat().st_size > 10_000
    assert browser.errors() == []
    assert [u for u in browser.requests() if u != url and not u.startswith("data:")] == []


# -- every ranking method (issue 23) ------------------------------------------------------------------
def _five_part(five_methods) -> dict:
    return dataclasses.asdict(five_methods[2].layers[0])


def _old_part(part: dict) -> dict:
    """``part`` as a file written before every ranking was kept: gradsae and activation only, no new fields."""
    old = copy.deepcopy(part)
    for ex in old["examples"]:
        ex["top"] = {m: ex["top"][m] for m in ("gradsae", "activation")}
        kept = {c for rows in ex["top"].values() for c, _ in rows}
        ex["traces"] = [
            {k: v for k, v in t.items() if k not in ("scores", "token_scores")}
            for t in ex["traces"]
            if t["latent"] in kept
        ]
    return old


def test_layer_data_names_every_ranking_and_reads_old_files(five_methods):
    from tests.experiments.conftest import FIVE

    part = _five_part(five_methods)
    data = layer_data(part, None)
    assert data["methods"] == list(FIVE)
    for ex in part["examples"]:
        for method in FIVE:
            for latent, _ in ex["top"][method]:
                row = next(r for r in data["latents"] if r["latent"] == latent)
                assert ex["id"] in row["in_top"][method] and set(row["scores"]) == set(FIVE)
    old = layer_data(_old_part(part), None)
    assert old["methods"] == ["gradsae", "activation"]
    assert all(r["scores"] == {} and set(r["in_top"]) <= {"gradsae", "activation"} for r in old["latents"])


def _chips(browser: Browser) -> list[int]:
    return browser.js("[...document.querySelectorAll('#topk-list .chip')].map((c) => +c.dataset.latent)")


def _choose(browser: Browser, select: str, value: str) -> None:
    browser.js(
        f"(() => {{ const s = document.getElementById({json.dumps(select)}); s.value = {json.dumps(value)};"
        " s.dispatchEvent(new Event('change')); })()"
    )


def test_choosing_the_ranking_in_a_browser(five_methods, browser, tmp_path):
    """The select switches the TopK list, the token colours and the latent table to ig, random, ...;
    a page from an old file (GradSAE and activation only) still works."""
    part = _five_part(five_methods)
    ex = part["examples"][0]
    assert ex["top"]["ig"] != ex["top"]["gradsae"] != ex["top"]["random"]  # switching must change the list
    path = tmp_path / "five.html"
    path.write_text(score_page("five", "# five rankings\n", part))
    browser.open(path.as_uri())
    options = browser.js("[...document.querySelectorAll('#ranking-select option')].map((o) => o.value)")
    assert options == ["gradsae", "activation", "random", "ig", "relp"]
    assert _chips(browser) == [c for c, _ in ex["top"]["gradsae"]]
    by_gradsae = _backgrounds(browser)

    _choose(browser, "ranking-select", "ig")
    assert _chips(browser) == [c for c, _ in ex["top"]["ig"]]
    tokens = "document.getElementById('prompt-tokens').dataset"
    assert browser.js(f"{tokens}.ranking") == "ig" and browser.js(f"{tokens}.source") == "ig"
    assert browser.js(f"+{tokens}.latent") == ex["top"]["ig"][0][0]
    first = next(t for t in ex["traces"] if t["latent"] == ex["top"]["ig"][0][0])
    coloured = [i for i, b in enumerate(_backgrounds(browser)) if b]
    assert coloured == [p for p, v in zip(first["positions"], first["token_scores"]["ig"], strict=True) if v != 0]
    assert _backgrounds(browser) != by_gradsae or ex["top"]["ig"][0][0] == ex["top"]["gradsae"][0][0]

    _choose(browser, "ranking-select", "random")
    assert _chips(browser) == [c for c, _ in ex["top"]["random"]]
    assert browser.js(f"{tokens}.source") == "gradsae"  # random has no per-token values: GradSAE's shown

    browser.click("#tab-latents")
    heads = browser.js("[...document.querySelectorAll('#latent-table th')].map((t) => t.dataset.sort)")
    assert heads[-2:] == ["n_rank", "score_rank"]
    _choose(browser, "latent-ranking", "relp")
    shown = browser.js("[...document.querySelectorAll('#latent-table tr.latent-row')].map((r) => +r.dataset.latent)")
    rows = {r["latent"]: r for r in layer_data(part, None)["latents"]}
    assert shown[0] == max(rows, key=lambda c: rows[c]["scores"]["relp"])  # sorted by the chosen ranking's score
    assert browser.errors() == []
    browser.click("#tab-examples")
    shot = browser.screenshot(tmp_path / "rankings.png")
    assert shot.stat().st_size > 10_000

    old = tmp_path / "old.html"
    old.write_text(score_page("old", "# old file\n", _old_part(part)))
    browser.events.clear()  # open() waits for a load event: not the first page's
    browser.open(old.as_uri())
    assert browser.js("[...document.querySelectorAll('#ranking-select option')].map((o) => o.value)") == [
        "gradsae",
        "activation",
    ]
    _choose(browser, "ranking-select", "activation")
    assert _chips(browser) == [c for c, _ in ex["top"]["activation"]]
    assert browser.errors() == []
