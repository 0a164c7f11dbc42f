"""Concepts from the vision tower, on synthetic images whose CUIs are what they show.

Every image is a filled shape (circle or triangle) in one colour (red, green, blue), plain or
striped; each of these visual properties is one CUI. The embeddings come from the real tiny
LLaVA's vision tower (random weights still separate colour, shape and stripes), so kNN and the
probe can find the CUIs, while the tiny model's generated text maps to nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, hold_lock, read_csv, run_in_process

import concept_index
import generate_concepts
from jjvmed import errors, submission
from jjvmed.embeddings import embed_items, load_embeddings
from jjvmed.encoders import vision_encoder_from
from jjvmed.fusion import Decision, ImageScores, Ranked, predict_concepts
from jjvmed.images import id_sort_key
from jjvmed.index import ConceptIndex, Member, load_index
from jjvmed.probe import ProbeOptions, train_probe
from jjvmed.scores import ALLOWED_CUIS_2025, concept_scores, image_f1
from jjvmed.tables import read_concept_csv, read_cui_lists
from jjvmed.tuning import (
    THRESHOLDS,
    best_global_threshold,
    f1_per_image,
    fit_rule,
    gt_columns,
    held_out_f1,
    support_of,
    truth_for,
    tune,
)

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 70, 220)}
SHAPES = ("circle", "triangle")
# Colours and shapes stand for CUIs of the secondary-score list (modalities, body regions), so the
# secondary F1 is exercised too; stripes for one outside it.
CUIS = {"red": "C0040405", "green": "C0024485", "blue": "C0041618", "circle": "C0817096", "triangle": "C0000726",
        "stripes": "C9000021"}
SPLITS = {"train": 48, "valid": 24, "test": 24}
# Small batches and chunks, so the resume test can stop a run between chunks.
EMBED_FLAGS = ["--batch_size", "4", "--chunk_size", "8", "--num_workers", "0"]


def draw(rng: np.random.Generator, colour: str, shape: str, stripes: bool, size: int = 112):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (int(rng.integers(0, 40)),) * 3)
    d = ImageDraw.Draw(img)
    r = 34
    cx, cy = (size // 2 + int(x) for x in rng.integers(-3, 4, 2))
    fill = tuple(int(v + rng.integers(-10, 10)) for v in COLOURS[colour])
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    if stripes:
        for x in range(0, size, 8):
            d.line([(x, 0), (x, size)], fill=(255, 255, 255), width=2)
    return img


def make_split(folder: Path, n: int, seed: int) -> list[list[str]]:
    """n images cycling through every colour x shape x texture; returns their ID,CUIs rows."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        colour, shape, stripes = list(COLOURS)[i % 3], SHAPES[(i // 3) % 2], (i // 6) % 2 == 1
        image_id = f"{folder.name}_{i + 1}"
        draw(rng, colour, shape, stripes).save(folder / f"{image_id}.png")
        rows.append([image_id, ";".join([CUIS[colour], CUIS[shape]] + ([CUIS["stripes"]] if stripes else []))])
    return rows


def cli(*argv: str) -> int:
    return errors.run_cli(concept_index.main, list(argv))


def f1(gt_csv: Path, pred: dict[str, list[str]] | Path) -> float:
    gt = submission.concept_pairs(submission.read_rows(gt_csv))
    if isinstance(pred, Path):
        pred = submission.concept_pairs(submission.read_rows(pred))
    return concept_scores(gt, {i: tuple(c) for i, c in pred.items()})[0]["f1"]


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory) -> Path:
    """The whole path through the CLI: embed three splits, fit, generate concepts for validation, tune."""
    root = tmp_path_factory.mktemp("vision")
    from jjvmed.files import write_csv_atomic

    for seed, (split, n) in enumerate(SPLITS.items()):
        write_csv_atomic(root / f"{split}_concepts.csv", ["ID", "CUIs"], make_split(root / split, n, seed))
    # The manual ground truth: modality and body region only.
    manual = [[i, ";".join(c for c in cuis.split(";") if c in ALLOWED_CUIS_2025)]
              for i, cuis in read_csv(root / "valid_concepts.csv")[1:]]
    write_csv_atomic(root / "valid_concepts_manual.csv", ["ID", "CUIs"], manual)
    (root / "test" / "broken.png").write_bytes(b"not a png")
    for split in SPLITS:
        assert cli("embed", "--image_dir", str(root / split), "--embeddings", str(root / f"{split}.npz"),
                   "--base_model_path", str(tiny_model), *EMBED_FLAGS) == 0
    # the probe with its defaults, the ones a full-size fit uses
    assert cli("fit", "--embeddings", str(root / "train.npz"), "--train_concepts",
               str(root / "train_concepts.csv"), "--concept_index", str(root / "index")) == 0
    # The generate-style baseline: what the tiny model's generated text maps to, with the CUIs named.
    (root / "names.csv").write_text("CUI,Name\n" + "".join(f"{c},{n}\n" for n, c in CUIS.items()))
    assert errors.run_cli(generate_concepts.main, [
        "--image_dir", str(root / "valid"), "--output_csv", str(root / "generated_valid.csv"),
        "--output_csv_natural", str(root / "generated_valid_natural.csv"), "--cui_mapping_file",
        str(root / "names.csv"), "--base_model_path", str(tiny_model), "--adapter_repo", "none",
        "--max_new_tokens", "4", "--num_workers", "0", "--batch_size", "12"]) == 0
    assert cli("tune", "--concept_index", str(root / "index"), "--embeddings", str(root / "valid.npz"),
               "--valid_concepts", str(root / "valid_concepts.csv"), "--generated",
               str(root / "generated_valid.csv"), "--gt_manual", str(root / "valid_concepts_manual.csv"),
               "--concept_settings", str(root / "settings.json")) == 0
    return root


def test_knn_and_probe_find_what_the_images_show_where_generated_text_finds_nothing(run):
    results = {}
    for method in ("knn", "probe", "fused"):
        out = run / f"test_{method}.csv"
        assert cli("predict", "--concept_index", str(run / "index"), "--concept_settings", str(run / "settings.json"),
                   "--method", method, "--embeddings", str(run / "test.npz"), "--output_csv", str(out)) == 0
        results[method] = f1(run / "test_concepts.csv", out)
    assert results["knn"] >= 0.9 and results["probe"] >= 0.9 and results["fused"] >= 0.9, results
    assert f1(run / "valid_concepts.csv", run / "generated_valid.csv") < 0.2
    assert f1(run / "valid_concepts.csv", {}) == 0.0  # the empty prediction


def test_tuning_reports_each_method_and_settings_that_predict(run, capsys):
    settings = json.loads((run / "settings.json").read_text())
    assert set(settings["methods"]) == {"knn", "probe", "fused"}
    names = [row["method"] for row in settings["table"]]
    assert {"knn", "probe", "knn+probe", "generated", "union", "intersection", "weighted vote"} <= set(names)
    knn = settings["methods"]["knn"]
    assert [(m["knn"], m["probe"]) for m in knn["members"]] == [(1.0, 0.0)] and knn["generated"] == 0.0
    # fused is chosen by the F1 of its decision rule tuned on one half of the images and scored on the other
    assert settings["methods"]["fused"]["f1_heldout"] >= max(settings["methods"][m]["f1_heldout"]
                                                             for m in ("knn", "probe"))
    # decision rules tried for every method, each with its held-out estimate
    for rule in ("threshold", "per-CUI thresholds", "relative to the top", "count from the scores"):
        assert "f1_heldout" in next(r for r in settings["table"] if r["method"] == f"knn: {rule}")
    # with the manual ground truth, the secondary F1 (modality and body region) of every row
    assert all("f1_secondary" in row for row in settings["table"])
    assert settings["methods"]["knn"]["f1_secondary"] >= 0.9
    assert next(r for r in settings["table"] if r["method"] == "generated")["f1_secondary"] < 0.2


def test_the_tune_table_shows_both_f1s_of_every_row_under_their_headers(run):
    from jjvmed.tuning import format_table

    table = json.loads((run / "settings.json").read_text())["table"]
    assert all("f1_heldout" in row for row in table)  # the sources (knn, probe, ...) too
    header, *lines = format_table(table).splitlines()
    for row, line in zip(table, lines, strict=True):
        for title, key in (("F1 ", "f1"), ("held-out", "f1_heldout"), ("F1 sec.", "f1_secondary")):
            start = header.index(title)
            assert line[start:start + 6] == f"{row[key]:.4f}", (header, line)


def test_tuning_never_picks_settings_worse_than_a_single_method(run):
    """Here the generated concepts are right for half the images and the index has no probe: fused
    must still score at least the best of kNN and generated on the tuning split, as scores.py scores it."""
    index = load_index(run / "index")
    member = index.members[0]
    index = ConceptIndex(index.cuis, index.ids[:12], index.label_ptr[:13], index.label_idx[:index.label_ptr[12]],
                         [Member(member.encoder, member.vectors[:12], None)], index.meta)  # a weak kNN
    valid = load_embeddings(run / "valid.npz")
    gt = read_concept_csv(run / "valid_concepts.csv")
    truth = read_cui_lists(run / "valid_concepts.csv")
    ids = sorted(truth)
    generated = {i: truth[i] if n % 2 else ["C9000099"] for n, i in enumerate(ids)}
    settings, _ = tune(index, valid, gt, generated, per_cui=False)
    scores = {m: f1(run / "valid_concepts.csv", predict_concepts(index, s, valid, generated))
              for m, s in settings["methods"].items()}
    assert scores["fused"] >= max(scores["knn"], f1(run / "valid_concepts.csv", generated)) - 0.02, scores
    assert scores["fused"] == pytest.approx(settings["methods"]["fused"]["f1"], abs=1e-4)
    assert settings["methods"]["fused"]["f1_heldout"] >= settings["methods"]["knn"]["f1_heldout"]


def test_a_bad_image_is_reported_and_the_run_goes_on(run):
    emb = load_embeddings(run / "test.npz")
    assert "broken" in emb.failed and "broken" not in emb.ids
    assert len(emb.ids) == SPLITS["test"]
    assert read_csv(run / "test.errors.csv")[1][0] == "broken"
    rows = dict(map(tuple, read_csv(run / "test_knn.csv")[1:]))
    assert rows["broken"] == "" and len(rows) == SPLITS["test"] + 1  # a row for it, no concept


def test_resume_after_a_kill_gives_the_same_embeddings_file(run, tiny_model, tmp_path, capsys):
    out = tmp_path / "train.npz"
    parts = out.with_name("train.npz.parts")
    args = [sys.executable, str(ROOT / "concept_index.py"), "embed", "--image_dir", str(run / "train"), "--embeddings",
            str(out), "--base_model_path", str(tiny_model), *EMBED_FLAGS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list(parts.glob("*chunk-*.npz")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = len(list(parts.glob("*chunk-*.npz")))
    assert 1 <= done < SPLITS["train"] // 8 and not out.exists(), "the run should have been killed half-way"

    # the same command continues: the finished chunks' vectors are kept, the rest embedded
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{8 * done} images reused, {SPLITS['train'] - 8 * done} embedded" in resumed.stderr
    full, got = load_embeddings(run / "train.npz"), load_embeddings(out)
    assert got.ids == full.ids and np.array_equal(got.vectors, full.vectors)
    assert not parts.exists()


def test_a_second_run_on_the_same_embeddings_file_is_refused_at_once(run, tiny_model, tmp_path):
    from jjvmed.embeddings import EmbedOptions, ensure_embeddings
    from jjvmed.images import list_images

    out = tmp_path / "e.npz"
    holder = hold_lock(out)
    try:
        with pytest.raises(errors.UserError, match=f"another run \\(PID {holder.pid}\\) is using {out}"):
            ensure_embeddings(list_images(run / "valid")[:2], out, EmbedOptions(str(tiny_model), num_workers=0))
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()


def test_the_fast_f1_used_for_tuning_is_the_official_one():
    rng = np.random.default_rng(0)
    space = [f"C{n:07d}" for n in range(12)]
    ids = [f"img_{n}" for n in range(300)]
    gt = {}
    for n, i in enumerate(ids):
        picked = tuple(rng.choice(space, size=int(rng.integers(1, 5)), replace=False))
        gt[i] = ("",) if n % 25 == 0 else picked + ("",) if n % 40 == 1 else picked  # 'ID,' and 'ID,C1;' rows
    scores = np.sort(rng.random((len(ids), 12)).astype(np.float32) * (rng.random((len(ids), 12)) < 0.6), 1)[:, ::-1]
    cols = np.argsort(rng.random((len(ids), 12)), 1)
    cols[scores <= 0] = -1
    r = Ranked(cols, scores.copy())
    s = ImageScores(ids, space, np.ones(len(ids), bool), [], None, None)
    t = truth_for(r, s, gt)
    for threshold in (0.05, 0.3, 0.7):
        for keep_top in (False, True):
            fast = f1_per_image(r, t, Decision(threshold, keep_top))
            for n, i in enumerate(ids):
                pred = [space[c] for c, v in zip(cols[n], scores[n], strict=True) if c >= 0 and v >= threshold]
                if not pred and keep_top and cols[n, 0] >= 0:
                    pred = [space[cols[n, 0]]]
                assert fast[n] == pytest.approx(image_f1(gt[i], tuple(pred) or ("",)))
    # The threshold search gives the best of all thresholds, as the plain F1 above scores them.
    threshold, keep_top, best = best_global_threshold(r, t)
    brute = max(f1_per_image(r, t, Decision(x, top)).mean() for x in THRESHOLDS for top in (False, True))
    assert best == pytest.approx(brute) == pytest.approx(f1_per_image(r, t, Decision(threshold, keep_top)).mean())


def test_a_damaged_embeddings_file_is_one_line(run, tmp_path, capsys):
    damaged = tmp_path / "cut.npz"
    damaged.write_bytes((run / "test.npz").read_bytes()[:5000])  # a copy cut short
    commands = [["fit", "--embeddings", str(damaged), "--train_concepts", str(run / "train_concepts.csv"),
                 "--concept_index", str(tmp_path / "i")],
                ["tune", "--concept_index", str(run / "index"), "--embeddings", str(damaged), "--valid_concepts",
                 str(run / "valid_concepts.csv"), "--concept_settings", str(tmp_path / "s.json")],
                ["predict", "--concept_index", str(run / "index"), "--concept_settings", str(run / "settings.json"),
                 "--method", "knn", "--embeddings", str(damaged), "--output_csv", str(tmp_path / "p.csv")]]
    for command in commands:
        assert cli(*command) == 2, command[0]
        err = capsys.readouterr().err
        assert "is not an embeddings file" in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == [damaged]


def test_user_errors_are_one_line(run, tmp_path, capsys):
    assert cli("fit", "--embeddings", str(tmp_path / "none.npz"), "--train_concepts",
               str(run / "train_concepts.csv"), "--concept_index", str(tmp_path / "i")) == 2
    assert "does not exist" in capsys.readouterr().err
    settings = json.loads((run / "settings.json").read_text())
    settings["methods"]["fused"]["generated"] = 0.5
    (tmp_path / "s.json").write_text(json.dumps(settings))
    assert cli("predict", "--concept_index", str(run / "index"), "--concept_settings", str(tmp_path / "s.json"),
               "--embeddings",
               str(run / "test.npz"), "--output_csv", str(tmp_path / "p.csv")) == 2
    err = capsys.readouterr().err
    assert "add --generated" in err and len(err.strip().splitlines()) == 1


def test_predict_with_generated_cuis_of_images_the_embeddings_lack_is_refused(run, tmp_path, capsys):
    """Generated CUIs of other images than the embeddings' used to add silent empty rows to the submission."""
    for method in ("knn", "fused"):
        out = tmp_path / f"{method}.csv"
        assert cli("predict", "--concept_index", str(run / "index"), "--concept_settings", str(run / "settings.json"),
                   "--method", method, "--embeddings", str(run / "test.npz"), "--generated",
                   str(run / "generated_valid.csv"), "--output_csv", str(out)) == 2
        err = capsys.readouterr().err
        assert f"{SPLITS['valid']} images of {run / 'generated_valid.csv'} are not in {run / 'test.npz'}" in err, err
        assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_the_lora_adapter_leaves_the_image_features_unchanged(run, tiny_model, tiny_adapter):
    """The index is built from the base model; the generate run has the adapter loaded (it targets the
    language model and the projector only), and must get the same features from it."""
    from jjvmed.images import list_images
    from jjvmed.model import ModelSpec, load_model

    items = list_images(run / "valid")[:6]
    model, processor, _ = load_model(ModelSpec(str(tiny_model), str(tiny_adapter), device="cpu"))
    with_adapter = embed_items(vision_encoder_from(model, processor), items, 4, 0)
    base = load_embeddings(run / "valid.npz")
    assert with_adapter.ids == base.ids[:6]
    assert np.allclose(with_adapter.vectors[0], base.vectors[0][:6], atol=1e-6)


def test_per_cui_thresholds_fix_a_cui_that_the_global_threshold_cannot():
    """CUI A is right at scores 0.8 and wrong at 0.6; CUI B right at 0.3 and wrong at 0.1: no single
    threshold gets both, one each does, and the held-out halves confirm it."""
    n = 200
    rng = np.random.default_rng(0)
    has_a, has_b = rng.random(n) < 0.5, rng.random(n) < 0.5
    ids = [f"img_{i}" for i in range(n)]
    # images with neither have the row 'ID,', which an empty prediction matches
    gt = {i: tuple(c for c, on in (("C0000001", a), ("C0000002", b)) if on) or ("",)
          for i, a, b in zip(ids, has_a, has_b, strict=True)}
    score_a = np.where(has_a, 0.8, 0.6).astype(np.float32)
    score_b = np.where(has_b, 0.3, 0.1).astype(np.float32)
    cols = np.array([[0, 1]] * n)
    scores = np.stack([score_a, score_b], 1)
    space = ["C0000001", "C0000002"]
    s = ImageScores(ids, space, np.ones(n, bool), [], None, None)
    r = Ranked(cols, scores)
    t = truth_for(r, s, gt)
    _, _, f1_global = best_global_threshold(r, t)
    gt_cols = gt_columns(s, gt)
    tuned = fit_rule("per-CUI thresholds", r, t, support_of(gt_cols, np.arange(n), 2))
    assert f1_global < 0.9 and f1_per_image(r, t, tuned).mean() == pytest.approx(1.0)
    assert held_out_f1("per-CUI thresholds", r, t, gt_cols, 2) == pytest.approx(1.0)
    assert held_out_f1("threshold", r, t, gt_cols, 2) < 0.9


# ---------------------------------------------------------------------------------------------
# generate_concepts.py --method knn|probe|fused
# ---------------------------------------------------------------------------------------------


def vision_args(run: Path, tiny_model: Path, out: Path, method: str, *extra: str) -> list[str]:
    return ["--image_dir", str(run / "test"), "--output_csv", str(out), "--method", method, "--concept_index",
            str(run / "index"), "--concept_settings", str(run / "settings.json"), "--base_model_path",
            str(tiny_model), *(["--adapter_repo", "none"] if method == "fused" else []), "--num_workers", "0", *extra]


def test_knn_and_probe_runs_label_the_images_in_the_ids_csv_order_without_generating_text(run, tiny_model, tmp_path):
    ids = [r[0] for r in read_csv(run / "test_concepts.csv")[1:]] + ["broken"]
    order = ids[1::2] + ids[::2]  # not the natural order
    (tmp_path / "ids.csv").write_text("ID\n" + "".join(f"{i}\n" for i in order))
    for method in ("knn", "probe"):
        out = tmp_path / f"{method}.csv"
        done = run_in_process("generate_concepts.py", *vision_args(run, tiny_model, out, method, "--ids_csv",
                                                                   str(tmp_path / "ids.csv"), "--zip",
                                                                   str(tmp_path / f"{method}.zip")))
        assert done.returncode == 0, done.stderr
        assert "the official checks say accepted" in done.stderr
        rows = read_csv(out)
        assert rows[0] == ["ID", "CUIs"] and [r[0] for r in rows[1:]] == order
        assert dict(map(tuple, rows[1:]))["broken"] == ""  # an unreadable image: a row, no concept
        assert f1(run / "test_concepts.csv", out) >= 0.9, method
        assert (tmp_path / f"{method}.zip").exists() and (tmp_path / f"{method}.embeddings.npz").exists()
        assert not (tmp_path / f"{method}_natural.csv").exists() and not (tmp_path / f"{method}.journal.jsonl").exists()


def test_a_knn_run_again_reuses_the_vectors_of_unchanged_images_and_embeds_a_changed_one(run, tiny_model,
                                                                                       tmp_path, monkeypatch):
    images = tmp_path / "images"
    shutil.copytree(run / "test", images)
    out = tmp_path / "knn.csv"
    args = [*vision_args(run, tiny_model, out, "knn"), "--image_dir", str(images)]
    first = run_in_process("generate_concepts.py", *args)
    assert first.returncode == 0, first.stderr
    # the unreadable image is a failure, neither embedded nor reused
    assert re.search(r"images: (\d+) \(embedded now: (\d+), reused: 0\)\nfailures: 1", first.stderr), first.stderr
    total, embedded = map(int, re.search(r"images: (\d+) \(embedded now: (\d+)", first.stderr).groups())
    assert embedded == total - 1, first.stderr
    rate = re.search(r"([\d.]+) images/s while embedding", first.stderr)
    assert rate and float(rate.group(1)) > 0, first.stderr
    rows = dict(map(tuple, read_csv(out)[1:]))
    assert rows["test_1"] != rows["test_2"]  # red and green

    def no_model(*args, **kwargs):
        raise AssertionError("every vector is there: nothing to load")

    with monkeypatch.context() as patched:
        patched.setattr("jjvmed.embeddings.load_encoder", no_model)
        patched.setattr("jjvmed.embeddings.embed_items", no_model)
        (images / "broken.png").unlink()  # the one image that fails, and so is tried again every time
        again = run_in_process("generate_concepts.py", *args)
    assert again.returncode == 0, again.stderr
    assert "embedded now: 0, reused: 24" in again.stderr
    assert dict(map(tuple, read_csv(out)[1:])) == {i: c for i, c in rows.items() if i != "broken"}

    shutil.copy(images / "test_2.png", images / "test_1.png")  # another picture under the same ID
    changed = run_in_process("generate_concepts.py", *args)
    assert changed.returncode == 0, changed.stderr
    assert "embedded now: 1, reused: 23" in changed.stderr
    assert dict(map(tuple, read_csv(out)[1:]))["test_1"] == rows["test_2"]


def test_a_fused_run_keeps_the_generated_phrases_and_fuses_again_without_the_model(run, tiny_model, tmp_path,
                                                                                   monkeypatch):
    def second_load(*args, **kwargs):
        raise AssertionError("the fused run embeds with the model it generated with")

    monkeypatch.setattr("jjvmed.embeddings.load_encoder", second_load)
    out = tmp_path / "fused.csv"
    done = run_in_process("generate_concepts.py", *vision_args(
        run, tiny_model, out, "fused", "--cui_mapping_file", str(run / "names.csv"), "--max_new_tokens", "4",
        "--batch_size", "12", "--zip", str(tmp_path / "fused.zip")))
    assert done.returncode == 0, done.stderr
    assert "the official checks say accepted" in done.stderr and (tmp_path / "fused.zip").exists()
    natural, fused = read_csv(tmp_path / "fused_natural.csv"), read_csv(out)
    ids = sorted([r[0] for r in read_csv(run / "test_concepts.csv")[1:]] + ["broken"], key=id_sort_key)
    assert natural[0] == ["ID", "Concepts"] and [r[0] for r in natural[1:]] == ids == [r[0] for r in fused[1:]]
    assert (tmp_path / "fused.journal.jsonl").exists()  # the raw text, as for --method generate
    assert f"embeddings: {tmp_path / 'fused.embeddings.npz'}" in done.stderr  # the summary names both files
    assert f1(run / "test_concepts.csv", out) >= 0.9

    # Fused again from what the run kept, with no model at all: the same file.
    refuse = ["--from_natural_csv", str(tmp_path / "fused_natural.csv"), "--method", "fused", "--concept_index",
              str(run / "index"), "--embeddings", str(tmp_path / "fused.embeddings.npz"), "--cui_mapping_file",
              str(run / "names.csv")]
    again = run_in_process("generate_concepts.py", *refuse, "--concept_settings", str(run / "settings.json"),
                           "--output_csv", str(tmp_path / "again.csv"))
    assert again.returncode == 0, again.stderr
    assert read_csv(tmp_path / "again.csv") == fused

    # New settings (the union of kNN and the generated CUIs) and an edited phrase list: the generated side counts.
    settings = json.loads((run / "settings.json").read_text())
    settings["methods"]["fused"] = {**settings["methods"]["knn"], "source": "union", "generated": 1.0}
    (tmp_path / "union.json").write_text(json.dumps(settings))
    edited = [natural[0]] + [[i, "stripes"] if n == 0 else [i, p] for n, (i, p) in enumerate(natural[1:])]
    from jjvmed.files import write_csv_atomic

    write_csv_atomic(tmp_path / "fused_natural.csv", edited[0], edited[1:])
    union = run_in_process("generate_concepts.py", *refuse, "--concept_settings", str(tmp_path / "union.json"),
                           "--output_csv", str(tmp_path / "union.csv"))
    assert union.returncode == 0, union.stderr
    rows = read_csv(tmp_path / "union.csv")
    assert CUIS["stripes"] not in fused[1][1].split(";")  # the first image is plain: only the edit says stripes
    assert CUIS["stripes"] in rows[1][1].split(";")


def test_a_missing_or_mismatched_concept_index_fails_in_one_line_before_the_model_loads(run, tmp_path):
    base = ["--image_dir", str(run / "test"), "--output_csv", str(tmp_path / "c.csv"), "--base_model_path",
            "/no/such/model", "--method", "knn"]
    settings = json.loads((run / "settings.json").read_text())
    settings["index"]["images"] += 1
    (tmp_path / "other.json").write_text(json.dumps(settings))
    cases = {
        "needs --concept_index DIR": [],
        "no index.npz in": ["--concept_index", str(tmp_path / "none"), "--concept_settings",
                            str(run / "settings.json")],
        "do not exist": ["--concept_index", str(run / "index"), "--concept_settings", str(tmp_path / "none.json")],
        "tuned on another concept index": ["--concept_index", str(run / "index"), "--concept_settings",
                                           str(tmp_path / "other.json")],
        "/no/such/model: no such folder": ["--concept_index", str(run / "index"), "--concept_settings",
                                           str(run / "settings.json")],  # the index's tower is LLaVA's
    }
    for expected, extra in cases.items():
        done = run_in_process("generate_concepts.py", *base, *extra)
        assert done.returncode == 2 and expected in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c.csv").exists()


@pytest.mark.parametrize("method", ["knn", "probe"])
def test_knn_and_probe_under_a_launcher_are_refused_in_one_line_before_anything_loads(run, tmp_path, monkeypatch,
                                                                                    method):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    done = run_in_process("generate_concepts.py", *vision_args(run, Path("/no/such/model"), tmp_path / "c.csv",
                                                               method))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "one process" in done.stderr and list(tmp_path.iterdir()) == []


def test_probe_training_stops_when_the_held_out_f1_stops_rising_and_keeps_the_best_pass(run):
    index = load_index(run / "index")
    vectors = index.members[0].vectors
    probe = train_probe(vectors, index.label_matrix(), ProbeOptions(epochs=30, patience=2, held_out=0.5,
                                                                    device="cpu"))
    f1s = probe.info["held_out_f1"]
    best = int(np.argmax(f1s))
    assert probe.info["best_pass"] == best + 1
    assert len(f1s) == 30 or len(f1s) - 1 - best == 2  # stopped two passes after the best one
    assert probe.info["held_out_images"] == 24
