"""The error-analysis page: one self-contained HTML file with a run's scores and one card per image.

Plain inputs in (cards, a summary dict, CUI names), one file out. Nothing here reads CSVs or computes
official scores: evaluate.py does that and calls write_report(), so this module imports nothing of it.

The cards are rendered here, escaped, into an inert <template>: the browser parses them but neither lays
them out nor decodes their thumbnails until the page's script moves a page of them into view. That keeps
a 20,000-image report usable (numbers in the README) while the markup stays readable by any HTML parser.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import errors, files
from .images import load_image

THUMBNAIL_PX = 128  # longest side of a card's thumbnail
THUMBNAIL_QUALITY = 70  # JPEG quality: about 2-3 KB a thumbnail
CARDS_PER_PAGE = 50  # cards moved into view at a time; more follow as the reader scrolls
POOL_MIN_IMAGES = 200  # below this, starting worker processes costs more than it saves
SCORE_LABELS = {"f1": "F1", "f1_secondary": "F1 secondary", "rouge1": "ROUGE-1", "bertscore_f1": "BERTScore F1"}
EMPTY_CONCEPT = "empty CUIs field"  # the official reader turns `ID,` into the one concept ''


@dataclass(frozen=True)
class Card:
    """One image: its ground truth, what the run predicted, and how it scored. None: that task is not in the report."""

    image_id: str
    image_path: str | Path | None = None
    gt_caption: str | None = None
    pred_caption: str | None = None
    gt_cuis: tuple[str, ...] | None = None
    pred_cuis: tuple[str, ...] | None = None
    scores: dict[str, float] = field(default_factory=dict)
    methods: dict[str, tuple[str, ...]] = field(default_factory=dict)  # further concept methods the run kept


@dataclass(frozen=True)
class CuiRow:
    """How one CUI fared over all scored images; a ratio with a zero denominator is None."""

    cui: str
    name: str
    support: int  # images whose ground truth has it
    predicted: int  # images it was predicted for
    hits: int
    precision: float | None
    recall: float | None
    f1: float | None


# ---------------------------------------------------------------------------------------------
# From cards to what the page shows
# ---------------------------------------------------------------------------------------------


def concept_marks(gt: tuple[str, ...], pred: tuple[str, ...]) -> list[tuple[str, str]]:
    """(CUI, mark) with mark hit / missed / wrong, compared upper-cased as the official score does.

    Hits first, then what was missed, then what was predicted wrongly, each in the order written.
    """
    gt_upper = list(dict.fromkeys(c.upper() for c in gt))
    pred_upper = list(dict.fromkeys(c.upper() for c in pred))
    gt_set, pred_set = set(gt_upper), set(pred_upper)
    return ([(c, "hit") for c in gt_upper if c in pred_set] + [(c, "missed") for c in gt_upper if c not in pred_set]
            + [(c, "wrong") for c in pred_upper if c not in gt_set])


def ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def cui_table(cards: Iterable[Card], cui_names: dict[str, str]) -> list[CuiRow]:
    """Per-CUI support, precision, recall and F1 over the cards the primary F1 scores, most frequent first.

    As in the official score, an image whose ground truth has no concepts field is not scored, and a
    missing prediction is an empty one. The empty concept '' is not a CUI and is left out.
    """
    support: Counter[str] = Counter()
    predicted: Counter[str] = Counter()
    hits: Counter[str] = Counter()
    for card in cards:
        if not card.gt_cuis:
            continue
        gt = {c.upper() for c in card.gt_cuis} - {""}
        pred = {c.upper() for c in card.pred_cuis or ()} - {""}
        support.update(gt)
        predicted.update(pred)
        hits.update(gt & pred)
    rows = []
    for cui in support.keys() | predicted.keys():
        s, p, h = support[cui], predicted[cui], hits[cui]
        rows.append(CuiRow(cui, cui_names.get(cui, ""), s, p, h, ratio(h, p), ratio(h, s), ratio(2 * h, s + p)))
    return sorted(rows, key=lambda r: (-r.support, -r.predicted, r.cui))


def score_keys(cards: Iterable[Card]) -> list[str]:
    """Every per-image score key present, the official ones first."""
    present = list(dict.fromkeys(k for card in cards for k in card.scores))
    return [k for k in SCORE_LABELS if k in present] + [k for k in present if k not in SCORE_LABELS]


def score_label(key: str) -> str:
    return SCORE_LABELS.get(key, key)


def thumbnail(path: str | Path) -> tuple[str | None, str | None]:
    """(JPEG data URI, None), or (None, a note saying why the image could not be shown)."""
    try:
        image = load_image(path)
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    except FileNotFoundError:
        return None, f"image file not found: {Path(path).name}"
    except Exception as e:  # any undecodable file: a note on its card, never a failed report
        # Pillow's messages repeat the full path; the card already says which image it is.
        reason = errors.first_line(e).replace(f" '{path}'", "").replace(str(path), Path(path).name)
        return None, f"cannot open {Path(path).name}: {reason}"
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), None


def thumbnails(paths: list[str | Path | None], workers: int) -> list[tuple[str | None, str | None]]:
    """thumbnail() of every path, in order, over `workers` processes (decoding a large scan takes ~10-50 ms)."""
    todo = [p for p in paths if p is not None]
    if workers > 1 and len(todo) >= POOL_MIN_IMAGES:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the caller may hold torch's threads (BERTScore) that a fork would copy mid-state.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = iter(list(pool.map(thumbnail, todo, chunksize=64)))
    else:
        done = iter([thumbnail(p) for p in todo])
    return [next(done) if p is not None else (None, "no image file for this ID") for p in paths]


def distribution_svg(cards: list[Card]) -> str | None:
    """Histograms of the per-image official scores as one SVG data URI (matplotlib, Agg/SVG, no pyplot state)."""
    keys = [k for k in score_keys(cards) if k in SCORE_LABELS]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "jj-vmed-report", "font.size": 9}):
        figure = Figure(figsize=(3.3 * len(keys), 2.3), layout="constrained")
        axes = figure.subplots(1, len(keys), squeeze=False)[0]
        for ax, key in zip(axes, keys, strict=True):
            values = [c.scores[key] for c in cards if key in c.scores]
            mean = sum(values) / len(values)
            ax.hist(values, bins=20, range=(0.0, 1.0), color="#4c78a8", edgecolor="white", linewidth=0.5)
            ax.axvline(mean, color="#e45756", linestyle="--", linewidth=1.2)
            ax.set_title(f"{score_label(key)} per image (mean {mean:.3f})")
            ax.set_xlabel(score_label(key))
            ax.set_ylabel("images")
            ax.set_xlim(0, 1)
            ax.spines[["top", "right"]].set_visible(False)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# HTML: everything from data passes through esc() or script_json()
# ---------------------------------------------------------------------------------------------


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def script_json(value: object) -> str:
    """JSON safe inside <script>: no `<`, `>` or `&` survives to close the tag or open a comment."""
    text = json.dumps(value, ensure_ascii=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def fmt(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_summary(summary: dict) -> str:
    """A table per section: nested dicts become their own table, lists become bullet lists."""
    plain = {k: v for k, v in summary.items() if not isinstance(v, dict)}
    sections = ([("", plain)] if plain else []) + [(k, v) for k, v in summary.items() if isinstance(v, dict)]
    out = []
    for name, section in sections:
        rows = []
        for key, value in section.items():
            if isinstance(value, list | tuple):
                cell = "<ul>" + "".join(f"<li>{esc(v)}</li>" for v in value) + "</ul>"
            else:
                cell = esc(fmt(value))
            rows.append(f"<tr><th>{esc(key)}</th><td>{cell}</td></tr>")
        caption = f"<caption>{esc(name)}</caption>" if name else ""
        out.append(f'<table class="summary">{caption}{"".join(rows)}</table>')
    return "\n".join(out)


def render_cui_table(rows: list[CuiRow]) -> str:
    if not rows:
        return ""

    def num(value: float | None) -> str:
        return f'<td data-v="{-1 if value is None else value:.6f}">{"–" if value is None else f"{value:.3f}"}</td>'

    head = "".join(f'<th data-type="{t}">{esc(n)}</th>' for n, t in (
        ("CUI", "text"), ("Name", "text"), ("Support", "num"), ("Predicted", "num"), ("Hits", "num"),
        ("Precision", "num"), ("Recall", "num"), ("F1", "num")))
    body = "".join(
        f'<tr><td><a href="#images" data-filter="{esc(r.cui)}">{esc(r.cui)}</a></td><td>{esc(r.name)}</td>'
        f'<td data-v="{r.support}">{r.support:,}</td><td data-v="{r.predicted}">{r.predicted:,}</td>'
        f'<td data-v="{r.hits}">{r.hits:,}</td>{num(r.precision)}{num(r.recall)}{num(r.f1)}</tr>'
        for r in rows)
    return (f'<section id="cuis"><h2>Per CUI <span class="hint">({len(rows):,} CUIs; click a header to sort, a CUI '
            f'to filter the images)</span></h2><div class="scroll"><table id="cui-table" class="sortable">'
            f'<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div></section>')


def render_concepts(marks: list[tuple[str, str]], cui_names: dict[str, str]) -> str:
    items = []
    for cui, mark in marks:
        label = esc(cui_names.get(cui, "")) if cui else EMPTY_CONCEPT
        code = f" <code>{esc(cui)}</code>" if cui else ""
        items.append(f'<li class="{mark}" data-cui="{esc(cui)}">{label}{code}</li>')
    return f'<ul class="concepts">{"".join(items)}</ul>' if items else '<p class="none">no concepts</p>'


def render_caption(kind: str, label: str, text: str | None) -> str:
    if text is None:
        return ""
    body = esc(text) if text.strip() else '<span class="none">(empty)</span>'
    return f'<p class="caption {kind}"><span class="label">{label}</span> {body}</p>'


def render_card(card: Card, thumb: str | None, note: str | None, cui_names: dict[str, str], show_image: bool) -> str:
    scores = json.dumps({k: round(float(v), 6) for k, v in card.scores.items()}, separators=(",", ":"))
    parts = [f'<article class="card" data-id="{esc(card.image_id)}" data-scores="{esc(scores)}">']
    if show_image:
        if thumb:
            parts.append(f'<div class="thumb"><img src="{thumb}" alt="{esc(card.image_id)}" loading="lazy"></div>')
        else:
            parts.append(f'<div class="thumb"><p class="note">{esc(note)}</p></div>')
    parts.append(f'<div class="body"><header><h3>{esc(card.image_id)}</h3>')
    parts += [f'<span class="score" data-key="{esc(k)}">{esc(score_label(k))} <b>{float(v):.3f}</b></span>'
              for k, v in card.scores.items()]
    parts.append("</header>")
    parts.append(render_caption("gt", "Ground truth", card.gt_caption))
    parts.append(render_caption("pred", "Predicted", card.pred_caption))
    if card.gt_cuis is not None:
        if not card.gt_cuis:
            parts.append('<p class="none">no ground-truth concepts field: not scored</p>')
        parts.append(render_concepts(concept_marks(card.gt_cuis, card.pred_cuis or ()), cui_names))
    for name, cuis in card.methods.items():
        marks = [m for m in concept_marks(card.gt_cuis or (), cuis) if m[1] != "missed"]
        parts.append(f'<div class="method"><span class="label">{esc(name)}</span>{render_concepts(marks, cui_names)}'
                     "</div>")
    parts.append("</div></article>")
    return "".join(parts)


STYLE = """
:root { --hit: #1a7f37; --hit-bg: #dafbe1; --missed: #9a6700; --missed-bg: #fff8c5; --wrong: #cf222e;
  --wrong-bg: #ffebe9; --line: #d0d7de; --muted: #57606a; }
* { box-sizing: border-box; }
/* Text from the data may hold no break point at all (a degenerate prediction, a long path, ID or title): it
   wraps anywhere rather than widening the page. */
main { overflow-wrap: anywhere; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1f2328; }
main { max-width: 1240px; margin: 0 auto; padding: 16px 24px 48px; }
h1 { font-size: 22px; margin: 8px 0 4px; } h2 { font-size: 17px; margin: 22px 0 8px; }
.hint, .none, .subtitle { color: var(--muted); font-weight: normal; font-size: 13px; }
#top { display: flex; flex-wrap: wrap; gap: 16px 32px; align-items: flex-start; }
#top .tables { display: flex; flex-wrap: wrap; gap: 16px; }
#top img { max-width: 100%; }
table.summary { border-collapse: collapse; }
table.summary caption { text-align: left; font-weight: 600; padding-bottom: 2px; }
table.summary th { text-align: left; font-weight: normal; color: var(--muted); padding: 1px 16px 1px 0; }
table.summary td { font-variant-numeric: tabular-nums; } table.summary ul { margin: 0; padding-left: 16px; }
.scroll { max-height: 360px; overflow: auto; border: 1px solid var(--line); border-radius: 6px; }
#cui-table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
#cui-table th { position: sticky; top: 0; background: #f6f8fa; cursor: pointer; text-align: left;
  padding: 4px 8px; border-bottom: 1px solid var(--line); white-space: nowrap; user-select: none; }
#cui-table th[aria-sort=ascending]::after { content: " \\25B2"; } #cui-table th[aria-sort=descending]::after
  { content: " \\25BC"; }
#cui-table td { padding: 2px 8px; border-bottom: 1px solid #eaeef2; }
#cui-table td:nth-child(n+3), #cui-table th:nth-child(n+3) { text-align: right; }
.legend { margin: 0 0 8px; }
#controls { position: sticky; top: 0; background: #fff; z-index: 2; display: flex; flex-wrap: wrap; gap: 8px 16px;
  align-items: center; padding: 8px 0; border-bottom: 1px solid var(--line); }
#filter { width: 340px; padding: 5px 8px; font: inherit; } #sort { font: inherit; padding: 4px; }
#count { color: var(--muted); }
.card { display: flex; gap: 14px; padding: 12px 0; border-bottom: 1px solid var(--line); }
.thumb { flex: 0 0 132px; width: 132px; min-height: 60px; display: flex; justify-content: center; align-items: start; }
.thumb img { max-width: 128px; max-height: 128px; border-radius: 3px; background: #000; }
.thumb .note { margin: 0; padding: 6px; font-size: 12px; color: var(--wrong); background: var(--wrong-bg);
  border-radius: 4px; word-break: break-word; }
.body { flex: 1; min-width: 0; }
.body header { display: flex; flex-wrap: wrap; gap: 4px 12px; align-items: baseline; }
.body h3 { font-size: 14px; margin: 0 6px 0 0; font-family: ui-monospace, monospace; }
.score { background: #f6f8fa; border: 1px solid var(--line); border-radius: 10px; padding: 0 8px; font-size: 12px; }
.caption { margin: 4px 0; } .caption .label, .method .label { display: inline-block; min-width: 92px;
  color: var(--muted); font-size: 12px; }
.concepts { list-style: none; margin: 6px 0 0; padding: 0; display: flex; flex-wrap: wrap; gap: 4px; }
.concepts li { border-radius: 4px; padding: 1px 7px; font-size: 12.5px; border: 1px solid; }
.concepts li code { font-size: 11px; opacity: 0.8; }
.concepts li::before { font-weight: bold; margin-right: 4px; }
li.hit { color: var(--hit); background: var(--hit-bg); border-color: #aceebb; } li.hit::before { content: "\\2713"; }
li.missed { color: var(--missed); background: var(--missed-bg); border-color: #eac54f; border-style: dashed; }
li.missed::before { content: "\\25CB"; }
li.wrong { color: var(--wrong); background: var(--wrong-bg); border-color: #ffcecb; } li.wrong::before
  { content: "\\2717"; }
.method { display: flex; gap: 8px; align-items: baseline; margin-top: 4px; }
.method .concepts { margin: 0; }
#more { margin: 16px auto; display: block; padding: 6px 18px; font: inherit; } #more[hidden] { display: none; }
"""

SCRIPT = """
(function () {
  "use strict";
  const config = JSON.parse(document.getElementById("report-config").textContent);
  const list = document.getElementById("cards"), more = document.getElementById("more");
  const filter = document.getElementById("filter"), sort = document.getElementById("sort");
  const count = document.getElementById("count");
  const template = document.getElementById("card-data");
  // Cards stay in the inert template until shown; each item keeps its node, scores and (lazily) its text.
  const items = Array.from(template ? template.content.children : [], (node, index) => (
    {node, index, scores: JSON.parse(node.dataset.scores || "{}"), text: null}));
  let order = [], shown = 0;

  function searchText(item) {
    if (item.text === null) item.text = (item.node.dataset.id + " " + item.node.textContent).toLowerCase();
    return item.text;
  }
  function sorted(spec) {
    const [key, dir] = spec.split(":"), sign = dir === "desc" ? -1 : 1;
    if (key === "id") return items.slice().sort((a, b) => sign * (a.index - b.index));
    return items.slice().sort((a, b) => {
      const x = a.scores[key], y = b.scores[key];
      if (x === undefined || y === undefined) return (x === undefined) - (y === undefined) || a.index - b.index;
      return sign * (x - y) || a.index - b.index;
    });
  }
  function showMore() {
    const next = order.slice(shown, shown + config.perPage).map((item) => item.node);
    list.append(...next);
    shown += next.length;
    more.hidden = shown >= order.length;
    count.textContent = "showing " + shown.toLocaleString() + " of " + order.length.toLocaleString() +
      (order.length < items.length ? " matching (" + items.length.toLocaleString() + " images)" : " images");
  }
  function update() {
    const terms = filter.value.toLowerCase().split(/\\s+/).filter(Boolean);
    order = sorted(sort.value).filter((item) => terms.every((t) => searchText(item).includes(t)));
    list.replaceChildren();
    shown = 0;
    showMore();
  }
  let timer = 0;
  filter.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(update, 150); });
  sort.addEventListener("change", update);
  more.addEventListener("click", showMore);
  if ("IntersectionObserver" in window) {
    new IntersectionObserver((entries) => { if (entries[0].isIntersecting && !more.hidden) showMore(); },
                             {rootMargin: "600px"}).observe(more);
  }
  document.addEventListener("click", (event) => {
    const link = event.target.closest("[data-filter]");
    if (!link) return;
    filter.value = link.dataset.filter;
    update();
  });
  // Per-CUI table: click a header to sort by it, again to reverse.
  document.querySelectorAll("table.sortable").forEach((table) => {
    const heads = Array.from(table.tHead.rows[0].cells);
    heads.forEach((th, column) => th.addEventListener("click", () => {
      const ascending = th.getAttribute("aria-sort") === "descending" ||
        (th.getAttribute("aria-sort") === null && th.dataset.type === "text");
      heads.forEach((h) => h.removeAttribute("aria-sort"));
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      const value = (row) => th.dataset.type === "num" ? parseFloat(row.cells[column].dataset.v)
        : row.cells[column].textContent.toLowerCase();
      const rows = Array.from(table.tBodies[0].rows, (row) => [value(row), row]);
      rows.sort(([x], [y]) => (x < y ? -1 : x > y ? 1 : 0) * (ascending ? 1 : -1));
      table.tBodies[0].append(...rows.map(([, row]) => row));
    }));
  });
  // Timings for benchmarks/report_size.py: ms from navigation until the first cards show, and the script's share.
  const start = performance.now();
  update();
  document.body.dataset.scriptMs = Math.round(performance.now() - start);
  document.body.dataset.readyMs = Math.round(performance.now());
  // Build the search text in the background, a slice at a time: 20,000 cards take 0.3-1.5 s, which the
  // first filter would otherwise wait for.
  let indexed = 0;
  function indexSome() {
    for (const end = Math.min(indexed + 500, items.length); indexed < end; indexed++) searchText(items[indexed]);
    if (indexed < items.length) setTimeout(indexSome, 0);
  }
  setTimeout(indexSome, 0);
})();
"""


def render_page(*, title: str, summary: dict, cards: list[Card], cui_names: dict[str, str],
                thumbs: list[tuple[str | None, str | None]]) -> str:
    keys = score_keys(cards)
    show_image = any(c.image_path is not None for c in cards)
    sort_options = [(f"{k}:asc", f"{score_label(k)}, worst first") for k in keys]
    sort_options += [(f"{k}:desc", f"{score_label(k)}, best first") for k in keys]
    sort_options += [("id:asc", "image ID")]
    config = {"perPage": CARDS_PER_PAGE}
    plot = distribution_svg(cards)
    has_concepts = any(c.gt_cuis is not None for c in cards)
    legend = ('<ul class="concepts legend"><li class="hit">hit: in the ground truth and predicted</li>'
              '<li class="missed">missed: in the ground truth only</li><li class="wrong">wrong: predicted only</li>'
              '</ul>') if has_concepts else ""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body><main>",
        f'<h1>{esc(title)}</h1><p class="subtitle">{len(cards):,} images</p>',
        f'<section id="top"><div class="tables">{render_summary(summary)}</div>',
        f'<img id="distribution" src="{plot}" alt="per-image score distribution">' if plot else "",
        "</section>",
        render_cui_table(cui_table(cards, cui_names)) if has_concepts else "",
        '<section id="images"><h2>Images</h2>',
        legend,
        '<div id="controls"><input id="filter" type="search" placeholder="Filter: image ID, CUI or word" '
        'aria-label="filter the images">',
        '<select id="sort" aria-label="order of the images">',
        "".join(f'<option value="{esc(v)}">{esc(label)}</option>' for v, label in sort_options),
        '</select><span id="count"></span></div>',
        '<div id="cards"></div><button id="more" type="button">Show more</button>',
        '<template id="card-data">',
    ]
    parts += [render_card(card, thumb, note, cui_names, show_image)
              for card, (thumb, note) in zip(cards, thumbs, strict=True)]
    parts += [
        "</template></section></main>",
        f'<script type="application/json" id="report-config">{script_json(config)}</script>',
        f"<script>{SCRIPT}</script>",
        "</body></html>\n",
    ]
    return "\n".join(parts)


def write_report(path: str | Path, *, title: str, summary: dict, cards: list[Card], cui_names: dict[str, str],
                 workers: int | None = None) -> Path:
    """Render the whole page, then write it atomically: a failure leaves any earlier report as it was.

    Cards are expected in ID order; the page shows them worst first by its first score.
    """
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    show_image = any(c.image_path is not None for c in cards)
    thumbs = thumbnails([c.image_path for c in cards], workers) if show_image else [(None, None)] * len(cards)
    page = render_page(title=title, summary=summary, cards=cards, cui_names=cui_names, thumbs=thumbs)
    return files.write_text_atomic(path, page)
