"""evaluate.py report / report.py: the error-analysis page, read back with the standard library's HTML parser."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_IMAGES
from PIL import Image

import evaluate
from jjvmed import errors, report

VOID = {"img", "meta", "input", "br", "hr", "link"}


@dataclass
class Node:
    tag: str
    attrs: dict
    children: list = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        found = []
        for child in self.children:
            if isinstance(child, Node):
                if (tag is None or child.tag == tag) and (cls is None or cls in child.attrs.get("class", "").split()):
                    found.append(child)
                found += child.find_all(tag, cls)
        return found


class TreeBuilder(HTMLParser):
    """A strict tree: every element must be closed by its own end tag, so a page that is not well-formed fails."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Node(tag, dict(attrs)))

    def handle_endtag(self, tag):
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse(path: Path) -> Node:
    builder = TreeBuilder()
    builder.feed(path.read_text(encoding="utf-8"))
    builder.close()
    assert builder.stack == [builder.root], "unclosed elements at the end of the page"
    return builder.root


def cards_by_id(page: Node) -> dict[str, Node]:
    articles = page.find_all("article", "card")
    ids = [a.attrs["data-id"] for a in articles]
    assert len(ids) == len(set(ids)), "an image has two cards"
    return dict(zip(ids, articles, strict=True))


def marks(card: Node, where: Node | None = None) -> dict[str, str]:
    """CUI -> hit / missed / wrong (the item's class) for the card's scored concept list (or the given element's)."""
    lists = (where or card).find_all("ul", "concepts")
    return {li.attrs["data-cui"]: li.attrs["class"] for li in (lists[0].find_all("li") if lists else [])}


def caption(card: Node, kind: str) -> str:
    (paragraph,) = card.find_all("p", kind)
    label, *rest = paragraph.children  # the label, then the caption
    return "".join(c if isinstance(c, str) else c.text() for c in rest).removeprefix(" ")


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def tiny_images(folder: Path) -> Path:
    """A 16-bit greyscale PNG, an RGBA PNG and a file that is not an image."""
    folder.mkdir(parents=True, exist_ok=True)
    ramp = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "img_1.png")
    Image.new("RGBA", (300, 200), (200, 30, 30, 128)).save(folder / "img_2.png")
    (folder / "img_3.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png at all")
    return folder


SCRIPT_CAPTION = '<script>alert("x")</script> & "quotes" </template></article>'


@pytest.fixture
def crafted(tmp_path) -> dict[str, str]:
    """Three images: partly right, right, and with no prediction row; captions one of which holds markup."""
    return {
        "concepts_gt": write(tmp_path / "concepts_gt.csv",
                             "ID,CUIs\nimg_1,C0040405;C0817096;C0024485\nimg_2,C0041618\nimg_3,C0000726\n"),
        "concepts_pred": write(tmp_path / "concepts_pred.csv", "ID,CUIs\nimg_1,C0040405;c0000726\nimg_2,C0041618\n"),
        "captions_gt": write(tmp_path / "captions_gt.csv",
                             "ID,Caption\nimg_1,CT of the chest\nimg_2,Ultrasound of the abdomen\nimg_3,A knee\n"),
        "captions_pred": write(tmp_path / "captions_pred.csv",
                               'ID,Caption\nimg_1,CT of the chest\nimg_2,"' + SCRIPT_CAPTION.replace('"', '""')
                               + '"\nimg_3,\n'),
        "method": write(tmp_path / "method.csv", "ID,CUIs\nimg_1,C0817096\nimg_3,C0000726;C0006141\n"),
    }


def run_report(out: Path, *args: str) -> Node:
    assert evaluate.main(["report", "--output_html", str(out), *args]) == 0
    return parse(out)


def test_each_image_gets_one_card_with_hit_missed_wrong_marks_and_its_scores(tmp_path, crafted):
    page = run_report(tmp_path / "run.html", "--image_dir", str(tiny_images(tmp_path / "images")),
                      "--gt", crafted["concepts_gt"], "--pred", crafted["concepts_pred"],
                      "--gt", crafted["captions_gt"], "--pred", crafted["captions_pred"],
                      "--concepts_method", f"retrieval={crafted['method']}")
    cards = cards_by_id(page)
    assert sorted(cards) == ["img_1", "img_2", "img_3"]
    assert marks(cards["img_1"]) == {"C0040405": "hit", "C0817096": "missed", "C0024485": "missed",
                                     "C0000726": "wrong"}
    assert marks(cards["img_2"]) == {"C0041618": "hit"}
    assert marks(cards["img_3"]) == {"C0000726": "missed"}
    scores = {i: json.loads(c.attrs["data-scores"]) for i, c in cards.items()}
    assert scores["img_1"]["f1"] == pytest.approx(2 * 1 / (3 + 2))
    assert scores["img_2"]["f1"] == 1.0 and scores["img_3"]["f1"] == 0.0
    assert scores["img_1"]["rouge1"] == 1.0 and scores["img_3"]["rouge1"] == 0.0
    assert scores["img_1"]["f1 retrieval"] == pytest.approx(2 * 1 / (3 + 1))
    assert scores["img_3"]["f1 retrieval"] == pytest.approx(2 * 1 / (1 + 2))
    shown = {s.attrs["data-key"]: s.text() for s in cards["img_1"].find_all("span", "score")}
    assert shown["f1"] == "F1 0.400" and shown["rouge1"] == "ROUGE-1 1.000"
    # the other method's list: its hits and wrong concepts against the same ground truth
    (method,) = cards["img_3"].find_all("div", "method")
    assert marks(cards["img_3"], method) == {"C0000726": "hit", "C0006141": "wrong"}
    assert "Magnetic Resonance Imaging" in cards["img_1"].text()  # names from data/cui_names.csv
    assert caption(cards["img_2"], "gt") == "Ultrasound of the abdomen"
    # the summary shows the official scores the concepts and captions commands print
    summary = page.find_all("table", "summary")
    text = " ".join(t.text() for t in summary)
    assert f"{(0.4 + 1.0 + 0.0) / 3:.4f}" in text and "rouge1" in text
    assert page.find_all("img", None)[0].attrs["id"] == "distribution"


def test_a_caption_holding_a_script_tag_is_shown_as_text_and_never_runs(tmp_path, crafted):
    out = tmp_path / "run.html"
    page = run_report(out, "--gt", crafted["captions_gt"], "--pred", crafted["captions_pred"],
                      "--title", "<script>alert('title')</script>")
    assert caption(cards_by_id(page)["img_2"], "pred") == SCRIPT_CAPTION
    scripts = page.find_all("script")
    assert len(scripts) == 2  # the page's own: its settings (JSON) and its code
    assert json.loads(scripts[0].text()) and scripts[1].text().lstrip().startswith("(function")
    assert not any("alert" in s.text() for s in scripts)
    raw = out.read_text(encoding="utf-8")
    assert "<script>alert" not in raw and "&lt;script&gt;alert(&quot;x&quot;)" in raw
    assert not any(k.startswith("on") for node in page.find_all() for k in node.attrs)


def test_json_inside_the_page_cannot_close_its_script_tag():
    value = {"name": "</script><script>alert(1)</script><!-- & -->"}
    text = report.script_json(value)
    assert not {"<", ">", "&"} & set(text)
    assert json.loads(text) == value


def test_a_failed_render_leaves_the_previous_report_intact(tmp_path):
    out = tmp_path / "run.html"
    good = [report.Card("a", gt_cuis=("C0040405",), pred_cuis=("C0040405",), scores={"f1": 1.0})]
    report.write_report(out, title="first", summary={"f1": 1.0}, cards=good, cui_names={})
    before = out.read_bytes()
    # the second card fails to render, after the first one was: nothing may reach the disk
    broken = good + [report.Card("b", gt_cuis=("C1",), pred_cuis=(), scores={"custom": "not a number"})]
    with pytest.raises(ValueError):
        report.write_report(out, title="second", summary={"f1": 0.5}, cards=broken, cui_names={})
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.html"]  # no temp file left behind


def test_an_unreadable_or_missing_image_gets_a_note_instead_of_a_thumbnail(tmp_path):
    folder = tiny_images(tmp_path / "images")
    cards = [report.Card("img_1", image_path=folder / "img_1.png", scores={"f1": 1.0}),
             report.Card("img_3", image_path=folder / "img_3.png", scores={"f1": 0.0}),
             report.Card("gone", image_path=folder / "gone.png"),
             report.Card("no_file", image_path=None)]
    out = report.write_report(tmp_path / "run.html", title="t", summary={}, cards=cards, cui_names={})
    page = cards_by_id(parse(out))
    assert page["img_1"].find_all("img") and not page["img_1"].find_all("p", "note")
    for image_id, words in (("img_3", "cannot open img_3.png"), ("gone", "not found: gone.png"),
                            ("no_file", "no image file")):
        (note,) = page[image_id].find_all("p", "note")
        assert words in note.text() and not page[image_id].find_all("img")


def thumbnail_size(card: Node) -> tuple[int, int]:
    (img,) = card.find_all("img")
    prefix = "data:image/jpeg;base64,"
    assert img.attrs["src"].startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(img.attrs["src"][len(prefix):]))).size


def test_grey_16_bit_and_rgba_images_get_small_thumbnails(tmp_path, crafted):
    page = run_report(tmp_path / "run.html", "--image_dir", str(tiny_images(tmp_path / "images")),
                      "--gt", crafted["captions_gt"], "--pred", crafted["captions_pred"])
    cards = cards_by_id(page)
    assert thumbnail_size(cards["img_1"]) == (64, 48)
    assert thumbnail_size(cards["img_2"]) == (128, 85)


def test_real_medical_images_get_thumbnails_of_at_most_128_px(tmp_path):
    ids = sorted(p.stem for p in REAL_IMAGES.glob("*.png"))
    gt = write(tmp_path / "gt.csv", "ID,Caption\n" + "".join(f"{i},chest x-ray\n" for i in ids))
    pred = write(tmp_path / "pred.csv", "ID,Caption\n" + "".join(f"{i},x-ray of the chest\n" for i in ids))
    cards = cards_by_id(run_report(tmp_path / "run.html", "--image_dir", str(REAL_IMAGES),
                                   "--gt", gt, "--pred", pred))
    assert sorted(cards) == ids
    sizes = [thumbnail_size(card) for card in cards.values()]
    assert max(max(s) for s in sizes) == 128 and min(min(s) for s in sizes) > 0


def test_concepts_only_and_captions_only_reports_show_only_their_task(tmp_path, crafted):
    concepts = run_report(tmp_path / "c.html", "--gt", crafted["concepts_gt"],
                          "--pred", crafted["concepts_pred"], "--limit", "2")
    cards = cards_by_id(concepts)
    assert sorted(cards) == ["img_1", "img_2"]  # --limit: the first images in ID order
    assert not concepts.find_all("p", "caption") and concepts.find_all("table", "sortable")
    assert "first 2 of 3" in concepts.text()
    assert [o.attrs["value"] for o in concepts.find_all("option")][0] == "f1:asc"  # worst first by default
    captions = run_report(tmp_path / "k.html", "--gt", crafted["captions_gt"],
                          "--pred", crafted["captions_pred"])
    assert not captions.find_all("ul", "concepts") and not captions.find_all("table", "sortable")
    assert [o.attrs["value"] for o in captions.find_all("option")][0] == "rouge1:asc"
    assert len(cards_by_id(captions)) == 3


def test_per_cui_table_gives_support_precision_recall_and_f1(tmp_path, crafted):
    page = run_report(tmp_path / "run.html", "--gt", crafted["concepts_gt"],
                      "--pred", crafted["concepts_pred"])
    (table,) = page.find_all("table", "sortable")
    headers = [th.text() for th in table.find_all("th")]
    assert headers == ["CUI", "Name", "Support", "Predicted", "Hits", "Precision", "Recall", "F1"]
    rows = {r[0]: r for r in ([td.text() for td in tr.find_all("td")] for tr in table.find_all("tbody")[0]
                              .find_all("tr"))}
    assert rows["C0040405"][1:] == ["X-Ray Computed Tomography", "1", "1", "1", "1.000", "1.000", "1.000"]
    assert rows["C0000726"][2:] == ["1", "1", "0", "0.000", "0.000", "0.000"]  # predicted for the wrong image
    assert rows["C0817096"][2:] == ["1", "0", "0", "–", "0.000", "0.000"]  # never predicted: no precision
    assert set(rows) == {"C0040405", "C0817096", "C0024485", "C0041618", "C0000726"}


def test_report_without_a_complete_ground_truth_and_prediction_pair_is_a_one_line_error(tmp_path, crafted, capsys):
    out = tmp_path / "run.html"
    unlabelled = write(tmp_path / "unlabelled.csv", "img_1,\nimg_2,\n")  # no header, no value to judge by
    for args, words in (([], "needs --gt and --pred"),
                        (["--gt", crafted["concepts_gt"]], "holds concepts, but no --pred does"),
                        (["--pred", crafted["captions_pred"]], "holds captions, but no --gt does"),
                        (["--gt", crafted["concepts_gt"], "--pred", crafted["captions_pred"]], "no --pred does"),
                        (["--gt", crafted["concepts_gt"], "--gt", crafted["method"],
                          "--pred", crafted["concepts_pred"]], "two --gt files hold concepts"),
                        (["--gt", unlabelled, "--pred", crafted["concepts_pred"]], "concepts or captions"),
                        (["--gt", crafted["captions_gt"], "--pred", crafted["captions_pred"],
                          "--gt_manual", crafted["concepts_gt"]], "--gt_manual")):
        assert errors.run_cli(evaluate.main, ["report", "--output_html", str(out), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    assert not out.exists()


def test_the_old_report_option_spellings_still_work_with_a_deprecation_line(tmp_path, crafted, capsys):
    old = tmp_path / "old.html"
    assert evaluate.main(["report", "--out", str(old),
                          "--concepts_gt", crafted["concepts_gt"], "--concepts_pred", crafted["concepts_pred"],
                          "--captions_gt", crafted["captions_gt"], "--captions_pred", crafted["captions_pred"]]) == 0
    err = capsys.readouterr().err
    for name, new in (("--out", "--output_html"), ("--concepts_gt", "--gt"), ("--concepts_pred", "--pred"),
                      ("--captions_gt", "--gt"), ("--captions_pred", "--pred")):
        assert f"warning: {name} is deprecated and will be removed; use {new}" in err
    new = run_report(tmp_path / "new.html", "--gt", crafted["concepts_gt"], "--pred", crafted["concepts_pred"],
                     "--gt", crafted["captions_gt"], "--pred", crafted["captions_pred"])
    assert sorted(cards_by_id(new)) == ["img_1", "img_2", "img_3"]
    assert old.read_text(encoding="utf-8") == (tmp_path / "new.html").read_text(encoding="utf-8")


def summary_rows(page: Node, section: str) -> dict[str, str]:
    (table,) = [t for t in page.find_all("table", "summary") if t.find_all("caption")
                and t.find_all("caption")[0].text() == section]
    return {tr.find_all("th")[0].text(): tr.find_all("td")[0].text() for tr in table.find_all("tr")}


def test_a_partial_relevance_reads_as_its_value_and_the_parts_that_ran(tmp_path, crafted):
    page = run_report(tmp_path / "run.html", "--gt", crafted["captions_gt"], "--pred", crafted["captions_pred"])
    rows = summary_rows(page, "captions")
    rouge = float(rows["rouge1"])
    assert rows["relevance"] == (f"{rouge:.4f} (partial: 1 of 4 parts; skipped BERTScore, MedImageInsight, BLEURT; "
                                 "not the official score)")
    assert rows["factuality"] == "not computed (skipped: MedCAT, AlignScore)"
    assert not any("{" in value for value in rows.values())



CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
WINDOW_PX = 1400


def page_width_in_chromium(page: Path) -> int:
    """The laid-out page's width in a WINDOW_PX-wide headless chromium, after the page's script showed the cards."""
    measured = page.with_name("measured.html")
    probe = "<script>document.body.dataset.pageWidth = document.documentElement.scrollWidth;</script>"
    measured.write_text(page.read_text(encoding="utf-8").replace("</body>", probe + "</body>"), encoding="utf-8")
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              "--disable-background-networking", f"--user-data-dir={profile}",
                              f"--window-size={WINDOW_PX},900", "--dump-dom", measured.as_uri()],
                             capture_output=True, text=True, timeout=120, check=True).stdout
    marker = 'data-page-width="'
    return int(dom[dom.index(marker) + len(marker):].split('"', 1)[0])


@pytest.mark.skipif(not CHROMIUM, reason="needs chromium on PATH (Debian: apt-get install chromium)")
def test_a_long_unbroken_predicted_text_wraps_inside_the_window(tmp_path):
    unbroken = "CT" + "x" * 3000
    gt = write(tmp_path / "gt.csv", "ID,Caption\nimg_1,CT of the chest\nimg_2,An MRI\n")
    pred = write(tmp_path / ("pred_" + "y" * 200 + ".csv"), f"ID,Caption\nimg_1,{unbroken}\nimg_2,MRI\n")
    out = tmp_path / "run.html"
    page = run_report(out, "--gt", gt, "--pred", pred)
    assert caption(cards_by_id(page)["img_1"], "pred") == unbroken
    assert page_width_in_chromium(out) <= WINDOW_PX
