"""evaluate.py: official concept F1 (exact), caption metrics, and the submission checks."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROCO, needs_roco, read_csv, run_in_process, run_script

import evaluate
from jjvmed import errors, files, scores, submission


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def pairs(text: str, tmp_path: Path, name: str) -> dict:
    return submission.concept_pairs(submission.read_rows(write(tmp_path / name, text)))


def official_f1(gt_pairs: dict, candidate_pairs: dict) -> float:
    """The official evaluator's loop (taubsity/clef-caption-evaluation), with sklearn's binary F1."""
    from sklearn.metrics import f1_score

    total, count = 0.0, 0
    for image_key, gt_concepts in gt_pairs.items():
        if len(gt_concepts) == 0:
            continue
        candidate = [c.upper() for c in candidate_pairs.get(image_key, ())]
        gt = [c.upper() for c in gt_concepts]
        all_concepts = sorted(set(gt) | set(candidate))
        y_true = [int(c in gt) for c in all_concepts]
        y_pred = [int(c in candidate) for c in all_concepts]
        total += f1_score(y_true, y_pred, average="binary", zero_division=0)
        count += 1
    return total / count


def test_hand_computed_f1_values_and_the_official_readers_edge_cases(tmp_path):
    gt = pairs("ID,CUIs\na,C1;C2;C3\nb,C1\nc,\nd,\ne\nf,C7\n", tmp_path, "gt.csv")
    pred = pairs("ID,CUIs\na,C1;c4\nb,c1;\nc,\nd\ne,C9\nf,C7;C7\n", tmp_path, "pred.csv")
    assert gt["c"] == ("",) and gt["e"] == () and pred["d"] == () and pred["b"] == ("c1", "")
    summary, rows = scores.concept_scores(gt, pred)
    per = {r["ID"]: r["f1"] for r in rows}
    assert per["a"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 2))  # TP C1, FP C4, FN C2 C3 -> 0.4
    assert per["b"] == pytest.approx(2 / 3)  # the trailing ';' predicts '' -> a false positive
    assert per["c"] == 1.0  # 'ID,' against 'ID,': the empty concept matches
    assert per["d"] == 0.0  # 'ID,' against a bare 'ID': nothing predicted
    assert "e" not in per  # ground truth with no second field is not counted
    assert per["f"] == 1.0
    assert summary["images_scored"] == 5
    assert summary["f1"] == pytest.approx((0.4 + 2 / 3 + 1 + 0 + 1) / 5)


def perturbed(gt: dict[str, tuple[str, ...]], seed: int = 7) -> dict[str, tuple[str, ...]]:
    """Predictions as a model writes them: some concepts kept, wrong ones added, lower case, stray ';', gaps."""
    vocabulary = sorted({c for cs in gt.values() for c in cs if c})
    rng = random.Random(seed)
    pred = {}
    for image_id, concepts in gt.items():
        kept = [c for c in concepts if rng.random() < 0.6]
        kept += rng.sample(vocabulary, rng.randrange(0, 4))
        kept = [c.lower() if rng.random() < 0.1 else c for c in kept]
        if rng.random() < 0.05:
            kept.append("")  # a stray ';'
        if rng.random() < 0.05:
            continue  # image missing from the predictions
        pred[image_id] = tuple(kept)
    return pred


# sklearn's f1_score costs milliseconds a call (its input checks): all 8,180 images took minutes on a busy
# 2-core machine. The official loop runs on a seeded sample of 600 images instead, which holds every kind of
# row the perturbation and the ground truth make (the rarest, an empty ground-truth field, is 2% of the
# images; the test checks the sample has each), and compares image by image, which is stricter than the mean.
OFFICIAL_SAMPLE = 600


@needs_roco
def test_primary_f1_equals_the_official_definition_on_real_ground_truth_with_perturbed_predictions():
    gt = submission.concept_pairs(submission.read_rows(ROCO / "validation_concepts.csv"))
    pred = perturbed(gt)
    summary, rows = scores.concept_scores(gt, pred)
    assert summary["images_scored"] == 8180
    per_image = {r["ID"]: r["f1"] for r in rows}
    assert summary["f1"] == pytest.approx(sum(per_image.values()) / 8180, abs=1e-12)
    assert 0.3 < summary["f1"] < 0.9
    sample = random.Random(11).sample(sorted(gt), OFFICIAL_SAMPLE)
    kinds = Counter()
    for image_id in sample:
        kinds["missing"] += image_id not in pred
        kinds["stray ;"] += "" in pred.get(image_id, ())
        kinds["lower case"] += any(c != c.upper() for c in pred.get(image_id, ()))
        kinds["empty gt field"] += gt[image_id] == ("",)
        if not gt[image_id]:
            continue
        one = {image_id: gt[image_id]}
        assert per_image[image_id] == pytest.approx(official_f1(one, pred), abs=1e-12), image_id
    assert min(kinds["missing"], kinds["stray ;"], kinds["lower case"], kinds["empty gt field"]) > 0, kinds


def test_secondary_f1_filters_to_the_allowed_list_and_skips_images_left_empty(tmp_path):
    manual = pairs("ID,CUIs\na,C0040405;C0817096\nb,\nc,C9999999\nd,C0024485\n", tmp_path, "manual.csv")
    pred = pairs("ID,CUIs\na,C0040405;C1234567\nb,C0040405\nc,C0040405\nd,c0024485\n", tmp_path, "pred.csv")
    summary, _ = scores.concept_scores(manual, pred, manual=manual)
    # a: filtered gt {CT, Chest}, pred {CT} -> 2/3; b, c skipped (nothing allowed in gt); d: 1
    assert summary["images_scored_secondary"] == 2
    assert summary["f1_secondary"] == pytest.approx((2 / 3 + 1) / 2)
    summary, _ = scores.concept_scores(manual, pred, manual=manual, allowed=("C0817096",))
    assert summary["images_scored_secondary"] == 1 and summary["f1_secondary"] == 0.0


def test_an_allowed_cuis_value_that_is_neither_a_file_nor_cuis_is_one_line(tmp_path, capsys):
    """A mistyped path was read as a list of one 'CUI', which filtered every CUI out: secondary F1 0."""
    gt = write(tmp_path / "gt.csv", "ID,CUIs\na,C0040405\n")
    allowed = write(tmp_path / "allowed.txt", "CUI\nC0040405\nc0817096\n")
    base = ["concepts", "--gt", str(gt), "--pred", str(gt), "--gt_manual", str(gt), "--json"]
    for value, expected in ((str(tmp_path / "alowed.txt"), "is neither a file nor a list of CUIs"),
                            (str(write(tmp_path / "names.txt", "CUI,Name\nC0040405,CT\n")), "which is not a CUI")):
        assert errors.run_cli(evaluate.main, [*base, "--allowed_cuis", value]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
    for value in (str(allowed), "C0040405,c0817096"):
        assert errors.run_cli(evaluate.main, [*base, "--allowed_cuis", value]) == 0
        assert json.loads(capsys.readouterr().out)["f1_secondary"] == 1.0


def test_2025_rules_report_every_violation_with_its_line_and_reject(tmp_path):
    many = ";".join(f"C{i:07d}" for i in range(101))
    pred = write(tmp_path / "pred.csv", "ID,CUIs\na,C0000001\nb,C0000001;C0000001\na,C0000002\n"
                 f"c,{many}\nzzz,C0000003\nd,C1,C2\n\ne,c0000005;C0000005;\n")
    report = submission.validate_file("concepts", pred, ["a", "b", "c", "d", "e", "f"], rules="2025")
    text = "\n".join(report.errors)
    assert "line 3: concept repeated for 'b': C0000001" in text
    assert "line 4: duplicate image ID 'a' (first on line 2)" in text
    assert "line 5: 101 concepts" in text
    assert "line 6: unknown image ID 'zzz'" in text
    assert "line 7: 3 fields" in text
    assert "line 8: blank line" in text
    assert "1 missing (f)" in text
    assert any("line 9" in w and "letter cases" in w for w in report.warnings)
    assert any("line 9" in w and "stray ';'" in w for w in report.warnings)
    result = run_script("evaluate.py", "validate", "--task", "concepts", "--pred", str(pred), "--rules", "2025",
                        "--ids_csv", str(write(tmp_path / "ids.csv", "ID\na\nb\nc\nd\ne\nf\n")))
    assert result.returncode == 1 and "REJECTED" in result.stderr


def test_a_valid_submission_against_an_image_folder_is_accepted(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("x_1.jpg", "x_2.png"):
        (images / name).write_bytes(b"")
    pred = write(tmp_path / "pred.csv", "ID,CUIs\nx_1,C0040405;C0817096\nx_2,\n")
    assert evaluate.main(["validate", "--task", "concepts", "--pred", str(pred), "--ids_csv", str(images)]) == 0


def test_ids_containing_ID_are_flagged_because_the_evaluator_skips_them(tmp_path):
    pred = write(tmp_path / "pred.csv", "ID,CUIs\nimg_ID_1,C0040405\n")
    report = submission.validate_file("concepts", pred, ["img_ID_1"])
    assert any("contain 'ID'" in e for e in report.errors)


def test_caption_preprocessing_is_the_official_one():
    assert scores.preprocess_caption("CT, 12 mm (arrow); T2-weighted.") == "ct number mm arrow tnumberweighted"


def test_caption_scores_handle_empty_pairs_and_hand_computed_rouge(tmp_path):
    gt = {"a": "Chest x-ray.", "b": "", "c": "axial ct of the brain", "d": "mri"}
    pred = {"a": "chest x ray", "b": "", "c": "axial ct", "d": ""}
    summary, rows = scores.caption_scores(gt, pred)
    per = {r["ID"]: r["rouge1"] for r in rows}
    # "chest xray" (punctuation removed) vs "chest x ray": P=1/3, R=1/2 -> F=0.4
    assert per["a"] == pytest.approx(0.4)
    assert per["b"] == 1.0 and per["d"] == 0.0
    # "axial ct" vs "axial ct of the brain": P=1, R=2/5 -> F = 2*1*0.4/1.4
    assert per["c"] == pytest.approx(2 * 0.4 / 1.4)
    assert "bertscore_f1" not in summary and any("bertscore" in s for s in summary["skipped"])


@needs_roco
def test_captions_command_scores_real_captions_and_checks_the_file(tmp_path):
    gt = ROCO / "validation_captions.csv"
    rows = submission.read_rows(gt)[:51]
    pred = tmp_path / "pred.csv"
    files.write_csv_atomic(pred, ["ID", "Caption"], ([f[0], f[1].upper()] for _, f in rows[1:]))
    gt_small = tmp_path / "gt.csv"
    files.write_csv_atomic(gt_small, ["ID", "Caption"], (f for _, f in rows[1:]))
    per_image = tmp_path / "per_image.csv"
    result = run_script("evaluate.py", "captions", "--gt", str(gt_small), "--pred", str(pred), "--json",
                        "--per_image", str(per_image))
    out = json.loads(result.stdout)
    assert out["accepted"] and out["rouge1"] == 1.0 and out["bleu4"] == pytest.approx(1.0)
    assert len(submission.read_rows(per_image)) == 51


def test_a_caption_file_without_header_or_with_blank_lines_is_rejected(tmp_path):
    pred = write(tmp_path / "pred.csv", "a,CT of the chest\n\nb,\"MRI, axial\"\n")
    report = submission.validate_file("captions", pred, ["a", "b"])
    assert "line 1: the header row must be ID,Caption" in report.errors
    assert "line 2: blank line" in report.errors


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny random BERT with a WordPiece vocabulary of the captions' words, saved as a local model folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(["axial ct of the brain chest x ray mass number showing a lesion in left lung"] * 5,
                            trainers.WordPieceTrainer(vocab_size=100, special_tokens=specials))
    folder = tmp_path_factory.mktemp("tiny-bert")
    hf = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                           sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    hf.save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(hf), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    return folder


def test_bertscore_runs_from_a_local_model_folder(tiny_bert):
    gt = {"a": "axial ct of the brain", "b": "chest x ray", "c": ""}
    pred = {"a": "axial ct of the brain", "b": "mass", "c": ""}
    summary, rows = scores.caption_scores(gt, pred, str(tiny_bert), bertscore_layers=2)
    per = {r["ID"]: r["bertscore_f1"] for r in rows}
    assert per["a"] == pytest.approx(1.0, abs=1e-5) and per["c"] == 1.0 and per["b"] < 1.0
    with pytest.raises(errors.UserError, match="--bertscore_layers"):
        scores.caption_scores(gt, pred, str(tiny_bert))


def test_bertscore_weighs_words_by_every_ground_truth_caption_as_the_organisers_do(tiny_bert):
    """The organisers build BERTScorer(idf_sents=<every preprocessed ground-truth caption>) once: an image's
    score must not depend on whether another image's prediction is empty (and so left out of bert-score)."""
    from bert_score import BERTScorer

    gt = {"a": "Axial CT of the brain.", "b": "Chest X-ray showing a lesion", "c": "CT of the chest showing a mass",
          "d": "X-ray of the left lung"}
    pred = {"a": "CT of the brain", "b": "chest x ray of the lung", "c": "", "d": "x ray showing a lesion"}
    with_empty = {r["ID"]: r["bertscore_f1"] for r in scores.caption_scores(gt, pred, str(tiny_bert), 2)[1]}
    full = {r["ID"]: r["bertscore_f1"] for r in scores.caption_scores(gt, {**pred, "c": "ct of the lung"},
                                                                       str(tiny_bert), 2)[1]}
    organisers = BERTScorer(model_type=str(tiny_bert), num_layers=2, idf=True, lang="en",
                            idf_sents=[scores.preprocess_caption(c) for c in gt.values()])
    for image_id in "abd":
        official = organisers.score(cands=[scores.preprocess_caption(pred[image_id])],
                                    refs=[scores.preprocess_caption(gt[image_id])])[2].item()
        assert with_empty[image_id] == pytest.approx(full[image_id], abs=1e-5) == pytest.approx(official, abs=1e-5)
    assert with_empty["c"] == 0.0


# ---------------------------------------------------------------------------------------------
# BLEURT and the 2026 aggregates
# ---------------------------------------------------------------------------------------------

SENTENCES = ["axial ct of the brain showing a mass", "chest x ray with a small nodule in the right lung",
             "mri of the knee with a torn meniscus", "ultrasound of the liver showing a cyst",
             "coronal ct of the abdomen with contrast", "pet scan showing uptake in the lymph nodes",
             "angiogram of the left coronary artery", "plain radiograph of the pelvis number views"]


def build_tiny_bleurt(folder: Path) -> Path:
    """A tiny random BLEURT laid out like lucadiliello/BLEURT-20-D12: the package's own classes, and a
    sentencepiece vocabulary (spm.model) with the tokenizer_config.json the package writes."""
    import sentencepiece
    import torch

    model_class, _, _ = scores.bleurt_classes()  # the package imports only once mended
    from bleurt_pytorch import BleurtConfig

    folder.mkdir(parents=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4), model_prefix=str(folder / "spm"), vocab_size=80, model_type="unigram",
        hard_vocab_limit=False, pad_id=0, pad_piece="[PAD]", unk_id=1, unk_piece="[UNK]", bos_id=-1, eos_id=-1,
        control_symbols=["[CLS]", "[SEP]", "[MASK]"], minloglevel=2)
    (folder / "spm.vocab").unlink()
    specials = {"bos_token": "[CLS]", "cls_token": "[CLS]", "eos_token": "[SEP]", "sep_token": "[SEP]",
                "mask_token": "[MASK]", "pad_token": "[PAD]", "unk_token": "[UNK]"}
    files.write_text_atomic(folder / "tokenizer_config.json", json.dumps(
        {**specials, "do_lower_case": False, "split_by_punct": False, "sp_model_kwargs": {},
         "tokenizer_class": "BleurtSPTokenizer", "vocab_type": "spm"}))
    vocab_size = sentencepiece.SentencePieceProcessor(model_file=str(folder / "spm.model")).get_piece_size()
    torch.manual_seed(0)
    # Wider than default initial weights, so that different pairs get clearly different scores.
    config = BleurtConfig(vocab_size=vocab_size, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64, initializer_range=0.3,
                          architectures=["BleurtForSequenceClassification"])
    model_class(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bleurt(tmp_path_factory) -> Path:
    return build_tiny_bleurt(tmp_path_factory.mktemp("bleurt") / "tiny-bleurt")


# Nine pairs: one full batch of 8 and one of 1; 'c' is an empty pair, 'i' an empty prediction.
BLEURT_GT = {"a": "Axial CT of the brain, showing a mass.", "b": "Chest X-ray (PA): small nodule.", "c": "",
             "d": "MRI of the knee", "e": "Ultrasound of the liver showing a cyst", "f": "PET scan",
             "g": "Angiogram of the left coronary artery", "h": "Plain radiograph of the pelvis, 2 views",
             "i": "Coronal CT of the abdomen"}
BLEURT_PRED = {"a": "axial ct of the brain showing a mass", "b": "mri of the knee", "c": "", "d": "MRI of the knee.",
               "e": "ultrasound", "f": "pet scan showing uptake in the lymph nodes", "g": "angiogram",
               "h": "chest x ray", "i": ""}


def test_bleurt_scores_every_image_from_a_saved_model_in_batches(tiny_bleurt):
    import math

    summary, rows = scores.caption_scores(BLEURT_GT, BLEURT_PRED, bleurt_model=str(tiny_bleurt))
    per = {r["ID"]: r["bleurt"] for r in rows}
    assert list(per) == list(BLEURT_GT) and all(math.isfinite(s) for s in per.values())
    assert summary["bleurt"] == pytest.approx(sum(per.values()) / 9)
    assert len({round(s, 6) for s in per.values()}) > 5  # the pairs are told apart
    again, _ = scores.caption_scores(BLEURT_GT, BLEURT_PRED, bleurt_model=str(tiny_bleurt))
    assert again["bleurt"] == summary["bleurt"]
    # Padding must not change a score: batches of 8 (padded to the longest pair) equal one pair at a time.
    gts = [scores.preprocess_caption(BLEURT_GT[i]) for i in BLEURT_GT]
    preds = [scores.preprocess_caption(BLEURT_PRED[i]) for i in BLEURT_GT]
    one_by_one = scores.bleurt_scores(gts, preds, str(tiny_bleurt), batch_size=1)
    assert one_by_one == pytest.approx(list(per.values()), abs=1e-5)


def test_bleurt_puts_empty_captions_through_the_model_like_the_organisers(tiny_bleurt):
    import torch

    _, rows = scores.caption_scores(BLEURT_GT, BLEURT_PRED, bleurt_model=str(tiny_bleurt))
    per = {r["ID"]: r for r in rows}
    assert per["c"]["rouge1"] == 1.0  # ROUGE scores an empty pair 1 ...
    net, tokenizer = scores.load_bleurt(str(tiny_bleurt))
    with torch.inference_mode():
        direct = net(**tokenizer([""], [""], return_tensors="pt")).logits.item()
    assert per["c"]["bleurt"] == pytest.approx(direct, abs=1e-6) and per["c"]["bleurt"] != 1.0  # ... BLEURT does not


def test_bleurt_tokenizer_reads_the_sentencepiece_vocabulary_as_sentencepiece_does(tiny_bleurt):
    """transformers 4 (the organisers') tokenized with sentencepiece itself; transformers 5 converts spm.model."""
    import sentencepiece

    _, tokenizer = scores.load_bleurt(str(tiny_bleurt))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny_bleurt / "spm.model"))
    cls, sep = sp.piece_to_id("[CLS]"), sp.piece_to_id("[SEP]")
    texts = [scores.preprocess_caption(t) for t in [*BLEURT_GT.values(), *BLEURT_PRED.values()]]
    texts += [" leading space", "two  spaces", "ﬁbrosis ＣＴ µm", "unseen words zebra"]
    for text in texts:
        assert tokenizer(text)["input_ids"] == [cls, *sp.encode(text), sep], text
    pair = tokenizer("chest x ray", "mri")
    n = len(sp.encode("chest x ray"))
    assert pair["input_ids"] == [cls, *sp.encode("chest x ray"), sep, *sp.encode("mri"), sep]
    assert pair["token_type_ids"] == [0] * (n + 2) + [1] * (len(sp.encode("mri")) + 1)


def test_bleurt_model_folder_problems_are_one_line_errors(tmp_path, tiny_bleurt):
    with pytest.raises(errors.UserError, match="no config.json"):
        scores.load_bleurt(str(tmp_path))
    (tmp_path / "config.json").write_text((tiny_bleurt / "config.json").read_text())
    with pytest.raises(errors.UserError, match="has no tokenizer"):
        scores.load_bleurt(str(tmp_path))


@pytest.mark.skipif(not os.environ.get("JJVMED_BLEURT_MODEL"),
                    reason="set JJVMED_BLEURT_MODEL to a local lucadiliello/BLEURT-20-D12 folder")
def test_bleurt_20_d12_gives_the_scores_its_package_publishes():
    found = scores.bleurt_scores(["a bird chirps by the window", "this is a random sentence"],
                                    ["a bird chirps by the window", "this looks like a random sentence"],
                                    os.environ["JJVMED_BLEURT_MODEL"])
    assert found == pytest.approx([0.9604414105415344, 0.8080050349235535], abs=1e-4)


def test_relevance_and_factuality_are_reported_as_partial_naming_the_missing_parts(tmp_path, tiny_bleurt, capsys):
    summary, _ = scores.caption_scores(BLEURT_GT, BLEURT_PRED)
    assert "relevance" not in summary and "factuality" not in summary
    assert summary["relevance_partial"] == {"value": summary["rouge1"], "parts": "1 of 4",
                                            "skipped": ["BERTScore", "MedImageInsight", "BLEURT"]}
    assert summary["factuality_partial"] == {"value": None, "parts": "0 of 2", "skipped": ["MedCAT", "AlignScore"]}
    gt = tmp_path / "gt.csv"
    files.write_csv_atomic(gt, ["ID", "Caption"], BLEURT_GT.items())
    pred = tmp_path / "pred.csv"
    files.write_csv_atomic(pred, ["ID", "Caption"], BLEURT_PRED.items())
    assert evaluate.main(["captions", "--gt", str(gt), "--pred", str(pred), "--bleurt_model", str(tiny_bleurt)]) == 0
    out = capsys.readouterr().out
    with_bleurt, _ = scores.caption_scores(BLEURT_GT, BLEURT_PRED, bleurt_model=str(tiny_bleurt))
    expected = (with_bleurt["rouge1"] + with_bleurt["bleurt"]) / 2
    assert with_bleurt["relevance_partial"]["value"] == pytest.approx(expected)
    assert (f"relevance (partial: 2 of 4 parts; skipped BERTScore, MedImageInsight)  {expected:.4f}  not the "
            "official score") in out
    assert "factuality (skipped: MedCAT, AlignScore)" in out


def test_concepts_and_captions_exit_1_on_a_rejected_file_and_still_print_the_scores(tmp_path, capsys):
    gt = write(tmp_path / "gt.csv", "ID,CUIs\nimg_10,C0040405\nimg_2,C0817096\nimg_1,C0024485\n")
    in_order = write(tmp_path / "in_order.csv", "ID,CUIs\nimg_10,C0040405\nimg_2,\nimg_1,C0024485\n")
    natural = write(tmp_path / "natural.csv", "ID,CUIs\nimg_1,C0024485\nimg_2,\nimg_10,C0040405\n")
    assert evaluate.main(["concepts", "--gt", str(gt), "--pred", str(in_order)]) == 0
    assert evaluate.main(["concepts", "--gt", str(gt), "--pred", str(natural)]) == 1
    captured = capsys.readouterr()
    assert "line 2: ID order: expected 'img_10' at position 1, found 'img_1'" in captured.err
    assert "REJECTED" in captured.out and captured.out.count("f1                      0.6667") == 2
    assert evaluate.main(["concepts", "--gt", str(gt), "--pred", str(natural), "--rules", "2025"]) == 0
    gt_captions = write(tmp_path / "gt_captions.csv", "ID,Caption\nimg_10,a\nimg_2,b\n")
    unquoted = write(tmp_path / "unquoted.csv", 'ID,Caption\nimg_10,"a, b" (c)\nimg_2,b\n')
    result = run_script("evaluate.py", "captions", "--gt", str(gt_captions), "--pred", str(unquoted), "--json")
    out = json.loads(result.stdout)
    assert result.returncode == 1 and not out["accepted"] and out["rouge1"] < 1.0
    assert out["errors"] == ["line 2: the caption contains a comma but is not enclosed in double quotes"]


# ---------------------------------------------------------------------------------------------
# Which file is which: the other task's file is refused, a swapped --gt/--pred is warned
# ---------------------------------------------------------------------------------------------

CONCEPTS_GT = "ID,CUIs\nimg_1,C0040405;C0817096\nimg_2,C0024485\n"
CAPTIONS_GT = 'ID,Caption\nimg_1,"CT of the chest, axial"\nimg_2,MRI of the knee\n'


def test_scoring_a_file_of_the_other_task_is_a_one_line_error_saying_which_file_looks_like_which(tmp_path):
    concepts = str(write(tmp_path / "concepts.csv", CONCEPTS_GT))
    captions = str(write(tmp_path / "captions.csv", CAPTIONS_GT))
    no_header = str(write(tmp_path / "no_header.csv", "img_1,C0040405;C0817096\nimg_2,C0024485\n"))
    names = str(write(tmp_path / "natural.csv", "ID,Concepts\nimg_1,chest;x-ray computed tomography\nimg_2,\n"))
    cases = [
        (["captions", "--gt", concepts, "--pred", captions],
         f"--gt {concepts} looks like a concepts file (header ID,CUIs); --pred {captions} looks like a captions "
         "file (header ID,Caption)"),
        (["concepts", "--gt", captions, "--pred", concepts],
         f"--gt {captions} looks like a captions file (header ID,Caption); --pred {concepts} looks like a concepts"),
        (["captions", "--gt", no_header, "--pred", captions], "no header; its values are CUIs"),
        (["concepts", "--gt", captions, "--pred", captions], "run `evaluate.py captions`"),
        (["concepts", "--gt", concepts, "--pred", names], "format A, concept names rather than CUIs"),
        (["concepts", "--gt", concepts, "--pred", concepts, "--gt_manual", captions], "--gt_manual"),
    ]
    for args, words in cases:
        result = run_in_process("evaluate.py", *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and words in result.stderr, result.stderr


def test_validate_with_the_wrong_task_says_what_the_file_holds(tmp_path):
    captions = str(write(tmp_path / "captions.csv", CAPTIONS_GT))
    result = run_in_process("evaluate.py", "validate", "--task", "concepts", "--pred", captions)
    assert result.returncode == 2
    assert result.stderr == (f"error: --task concepts, but --pred {captions} looks like a captions file (header "
                             "ID,Caption): give --task captions\n")
    # A file with no header is still a submission: its problems are listed, not refused as another task's.
    no_header = str(write(tmp_path / "no_header.csv", "img_1,CT of the chest\n"))
    result = run_in_process("evaluate.py", "validate", "--task", "concepts", "--pred", no_header)
    assert result.returncode == 1 and "the header row must be ID,CUIs" in result.stderr


def swapped_warnings(args: list[str]) -> list[str]:
    result = run_in_process("evaluate.py", *args)
    return [line for line in result.stderr.splitlines() if "are --gt and --pred swapped?" in line]


def test_signs_of_a_swapped_gt_and_pred_are_warned_and_a_right_order_is_not(tmp_path):
    ids = [f"img_{i}" for i in range(1, 81)]
    rng = random.Random(3)
    vocabulary = [f"C{n:07d}" for n in range(1, 400)]
    truth = {i: rng.sample(vocabulary, 5) for i in ids}
    gt = write(tmp_path / "gt.csv", "ID,CUIs\n" + "".join(f"{i},{';'.join(c)}\n" for i, c in truth.items()))
    # a trial run: the first 60 images, a smaller vocabulary, a lower-case CUI and a stray ';'
    trial = {i: [c for c in truth[i] if c < "C0000100"] for i in ids[:60]}
    trial[ids[0]] = ["c0000001", "C0000002", ""]
    pred = write(tmp_path / "pred.csv", "ID,CUIs\n" + "".join(f"{i},{';'.join(c)}\n" for i, c in trial.items()))
    assert swapped_warnings(["concepts", "--gt", str(gt), "--pred", str(pred)]) == []
    warned = swapped_warnings(["concepts", "--gt", str(pred), "--pred", str(gt)])
    assert len(warned) == 3, warned
    assert "names 60 images, all of them also in --pred" in warned[0]
    assert "1 lower-case CUIs" in warned[1] and "1 stray ';'" in warned[1]
    assert "distinct CUIs" in warned[2]
    # swapped, the scores are still given: a warning is a likelihood, not a verdict
    assert run_in_process("evaluate.py", "concepts", "--gt", str(pred), "--pred", str(gt)).returncode == 1

    captions = {i: f"{rng.choice(['axial', 'coronal'])} ct of the {rng.choice(['chest', 'head', 'knee'])} {i}"
                for i in ids}
    gt = write(tmp_path / "gt_captions.csv", "ID,Caption\n" + "".join(f"{i},{c}\n" for i, c in captions.items()))
    generated = {i: rng.choice(["ct of the chest", "mri of the brain", "x ray of the chest"]) for i in ids}
    pred = write(tmp_path / "pred_captions.csv", "ID,Caption\n" + "".join(f"{i},{c}\n" for i, c in generated.items()))
    assert swapped_warnings(["captions", "--gt", str(gt), "--pred", str(pred)]) == []
    (warned,) = swapped_warnings(["captions", "--gt", str(pred), "--pred", str(gt), "--json"])
    assert "repeats a caption on 100% of its images" in warned and "on 0%" in warned


@needs_roco
def test_the_real_ground_truth_against_a_models_predictions_raises_no_swap_warning(tmp_path):
    gt_path = ROCO / "validation_concepts.csv"
    gt = submission.concept_pairs(submission.read_rows(gt_path))
    pred = tmp_path / "pred.csv"
    files.write_csv_atomic(pred, ["ID", "CUIs"], ([i, ";".join(c)] for i, c in perturbed(gt).items()))
    gt_rows, pred_rows = submission.read_rows(gt_path), submission.read_rows(pred)
    assert evaluate.swap_signs("concepts", str(gt_path), gt_rows, str(pred), pred_rows) == []
    assert evaluate.swap_signs("concepts", str(pred), pred_rows, str(gt_path), gt_rows)
    captions = submission.read_rows(ROCO / "validation_captions.csv")
    assert evaluate.file_kind(captions) == ("captions", "header ID,Caption")
    assert evaluate.file_kind(gt_rows[1:]) == ("concepts", "no header; its values are CUIs")
    assert evaluate.file_kind(captions[1:]) == ("captions", "no header; its values are text, not CUIs")


def test_per_image_notes_an_empty_prediction_that_the_official_reader_counts_as_one_concept(tmp_path):
    gt = write(tmp_path / "gt.csv", "ID,CUIs\na,C0040405\nb,C0817096\nc,C0024485\n")
    pred = write(tmp_path / "pred.csv", "ID,CUIs\na,\nb,C0817096;\nc,C0024485\n")
    per_image = tmp_path / "per_image.csv"
    assert evaluate.main(["concepts", "--gt", str(gt), "--pred", str(pred), "--per_image", str(per_image),
                          "--rules", "2025"]) == 0
    header, *rows = read_csv(per_image)
    by_id = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
    assert by_id["a"]["pred"] == "1" and float(by_id["a"]["f1"]) == 0.0  # the score stays the official one
    assert by_id["a"]["note"] == "the prediction's empty CUIs field counts as one concept ''"
    assert by_id["b"]["pred"] == "2" and "stray ';'" in by_id["b"]["note"]
    assert by_id["c"]["note"] == ""


# ---------------------------------------------------------------------------------------------
# The command line: one name per meaning, help everywhere, old spellings for a while
# ---------------------------------------------------------------------------------------------


def subcommands(parser) -> dict:
    import argparse

    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_every_command_has_a_description_and_every_option_has_help():
    parser = evaluate.build_parser()
    missing = []
    for name, command in subcommands(parser).items():
        if not command.description:
            missing.append(f"{name}: no description")
        missing += [f"{name} {a.option_strings[0]}: no help" for a in command._actions if a.option_strings
                    and not a.help]
    assert missing == []


def test_old_option_spellings_still_work_with_a_deprecation_line_and_typos_get_a_suggestion(tmp_path):
    ids = write(tmp_path / "ids.csv", "ID\nimg_1\nimg_2\n")
    pred = write(tmp_path / "pred.csv", CONCEPTS_GT)
    old = run_in_process("evaluate.py", "validate", "--task", "concepts", "--pred", str(pred), "--ids", str(ids))
    assert old.returncode == 0 and "warning: --ids is deprecated and will be removed; use --ids_csv" in old.stderr
    wrong = write(tmp_path / "wrong.csv", "ID,CUIs\nimg_2,C0024485\nimg_1,C0040405\n")
    new = run_in_process("evaluate.py", "validate", "--task", "concepts", "--pred", str(wrong), "--ids_csv", str(ids))
    assert new.returncode == 1 and "ID order" in new.stderr and "deprecated" not in new.stderr
    for typo, right in (("--ids-csv", "--ids_csv"), ("--imagedir", "--image_dir"), ("--outputhtml", "--output_html")):
        result = run_script("evaluate.py", "report", "--output_html", str(tmp_path / "r.html"), typo, "x")
        assert result.returncode == 2 and f"did you mean {right}?" in result.stderr
    assert "--ids " not in run_script("evaluate.py", "validate", "--help").stdout  # old spellings stay out of help


def test_report_scores_bleurt_with_bleurt_model(tmp_path, tiny_bleurt):
    gt = tmp_path / "gt.csv"
    files.write_csv_atomic(gt, ["ID", "Caption"], BLEURT_GT.items())
    pred = tmp_path / "pred.csv"
    files.write_csv_atomic(pred, ["ID", "Caption"], BLEURT_PRED.items())
    out = tmp_path / "run.html"
    assert evaluate.main(["report", "--output_html", str(out), "--gt", str(gt), "--pred", str(pred),
                          "--bleurt_model", str(tiny_bleurt)]) == 0
    expected, _ = scores.caption_scores(BLEURT_GT, BLEURT_PRED, bleurt_model=str(tiny_bleurt))
    page = out.read_text(encoding="utf-8")
    assert f"<th>bleurt</th><td>{expected['bleurt']:.4f}</td>" in page
    assert "partial: 2 of 4 parts; skipped BERTScore, MedImageInsight" in page
