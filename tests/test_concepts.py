"""generate_concepts.py end to end: model mode on the tiny LLaVA, and --from_natural_csv."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import REAL_IMAGES, ROCOV2, ROOT, needs_rocov2, read_csv

import generate_concepts
from jjvmed import errors
from jjvmed.images import id_sort_key


def concepts(*argv: str) -> int:
    return errors.run_cli(generate_concepts.main, list(argv))


def model_args(tiny_model: Path, tmp_path: Path, image_dir: Path = REAL_IMAGES) -> list[str]:
    return ["--image_dir", str(image_dir), "--output_csv", str(tmp_path / "concepts.csv"),
            "--output_csv_natural", str(tmp_path / "natural.csv"), "--base_model_path", str(tiny_model),
            "--adapter_repo", "none", "--max_new_tokens", "16", "--num_workers", "0", "--batch_size", "6"]


def test_model_run_writes_both_formats_with_every_image_once(tiny_model, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(REAL_IMAGES, images)
    (images / "broken.png").write_bytes(b"not a png")
    args = model_args(tiny_model, tmp_path, images) + ["--prompt_template", "vicuna"]
    assert concepts(*args) == 0
    assert "the official checks say accepted" in capsys.readouterr().err
    expected = sorted([p.stem for p in REAL_IMAGES.glob("*.png")] + ["broken"], key=id_sort_key)
    natural = read_csv(tmp_path / "natural.csv")
    cuis = read_csv(tmp_path / "concepts.csv")
    assert natural[0] == ["ID", "Concepts"] and cuis[0] == ["ID", "CUIs"]
    assert [r[0] for r in natural[1:]] == expected == [r[0] for r in cuis[1:]]
    assert dict(map(tuple, cuis[1:]))["broken"] == ""
    known = {r[0] for r in read_csv(generate_concepts.DEFAULT_MAPPING)[1:]}
    for _, field in cuis[1:]:
        codes = field.split(";") if field else []
        assert len(codes) == len(set(codes)) <= 100 and set(codes) <= known
    # The concept prompt is the adapter's: Spanish instruction, answer opening prefilled.
    header = json.loads((tmp_path / "concepts.journal.jsonl").read_text().splitlines()[0])
    assert header["settings"]["prompt"].endswith("ASSISTANT: Los conceptos médicos clave son:")
    assert header["settings"]["generation"]["max_new_tokens"] == 16


@needs_rocov2
def test_remapping_a_natural_csv_needs_no_model_and_reports_unmapped_phrases(tmp_path):
    natural = tmp_path / "natural.csv"
    natural.write_text(
        "ID,Concepts\n"
        "img_1,X-Ray Computed Tomography;Chest;Foramen Ovale, Patent\n"
        "img_2,\n"
        "img_3,tórax;resonancia magnética;flux capacitor;Chest\n"
        'img_4,"Foramen Ovale, Patent;image"\n', encoding="utf-8")
    out = tmp_path / "cuis.csv"
    assert concepts("--from_natural_csv", str(natural), "--output_csv", str(out),
                    "--cui_mapping_file", str(ROCOV2)) == 0
    assert read_csv(out) == [["ID", "CUIs"], ["img_1", "C0040405;C0817096;C0016522"], ["img_2", ""],
                             ["img_3", "C0817096;C0024485"], ["img_4", "C0016522"]]
    assert read_csv(tmp_path / "cuis.unmapped.csv") == [["Phrase", "Count"], ["flux capacitor", "1"]]


def test_no_auto_map_writes_only_the_natural_format(tiny_model, tmp_path):
    args = model_args(tiny_model, tmp_path) + ["--limit", "3", "--no-auto_map_cuis"]
    assert concepts(*args) == 0
    assert len(read_csv(tmp_path / "natural.csv")) == 4
    assert not (tmp_path / "concepts.csv").exists()


def test_a_bad_mapping_file_fails_before_the_model_loads(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("code,label\nC1,x\n")
    code = concepts("--image_dir", str(REAL_IMAGES), "--cui_mapping_file", str(bad), "--base_model_path",
                    "/no/such/model", "--output_csv", str(tmp_path / "c.csv"))
    assert code == 2
    assert "needs a CUI column and a name column" in capsys.readouterr().err


def test_the_default_mapping_file_is_the_shipped_one():
    args = generate_concepts.build_parser().parse_args([])
    assert Path(args.cui_mapping_file) == ROOT / "data" / "cui_names.csv"
    assert args.max_new_tokens == 150 and args.language == "es"
    assert args.method == "generate"  # the generated text's CUIs unless a vision method is asked for


def test_vision_flags_without_a_vision_method_are_refused_in_one_line(tmp_path, capsys):
    code = concepts("--image_dir", str(REAL_IMAGES), "--output_csv", str(tmp_path / "c.csv"), "--concept_index",
                    str(tmp_path), "--base_model_path", "/no/such/model")
    assert code == 2
    err = capsys.readouterr().err
    assert "--concept_index: only with --method knn, probe or fused" in err and len(err.strip().splitlines()) == 1


def test_a_limit_trial_never_writes_an_upload_zip(tiny_model, tmp_path, capsys):
    ids = tmp_path / "ids.csv"
    ids.write_text("ID,CUIs\n" + "".join(f"{p.stem},\n" for p in sorted(REAL_IMAGES.glob("*.png"))))
    zipped = tmp_path / "upload.zip"
    code = concepts(*model_args(tiny_model, tmp_path), "--ids_csv", str(ids), "--limit", "2", "--zip", str(zipped))
    err = capsys.readouterr().err
    assert code == 2 and "--zip with --limit 2" in err and len(err.strip().splitlines()) == 1
    assert not zipped.exists() and not (tmp_path / "concepts.csv").exists()


def test_two_outputs_naming_one_file_are_refused_before_anything_loads(tmp_path, capsys):
    same = tmp_path / "c.csv"
    link = tmp_path / "link.csv"
    link.symlink_to(same)
    for natural in (same, link):  # the same path, and a link to it
        code = concepts("--image_dir", str(REAL_IMAGES), "--output_csv", str(same), "--output_csv_natural",
                        str(natural), "--base_model_path", "/no/such/model")
        err = capsys.readouterr().err
        assert code == 2 and "given as two outputs" in err and len(err.strip().splitlines()) == 1
    assert not same.exists()


def test_a_trial_run_says_its_check_covered_only_the_first_ids(tiny_model, tmp_path, capsys):
    assert concepts(*model_args(tiny_model, tmp_path), "--limit", "3") == 0
    assert "the check covered the first 3 IDs only" in capsys.readouterr().err


def test_a_degenerate_unmapped_phrase_is_shortened_in_the_summary_but_kept_whole_in_the_report(tmp_path, capsys):
    phrase = "bla " * 1000  # what a looping model writes
    natural = tmp_path / "natural.csv"
    natural.write_text(f"ID,Concepts\nimg_1,Chest;{phrase.strip()}\n", encoding="utf-8")
    out = tmp_path / "cuis.csv"
    assert concepts("--from_natural_csv", str(natural), "--output_csv", str(out)) == 0
    summary = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("unmapped phrases"))
    assert len(summary) < 300 and "bla bla" in summary and "..." in summary
    assert read_csv(out.with_name("cuis.unmapped.csv"))[1][0] == phrase.strip()


def test_remapping_with_an_image_folder_keeps_the_rows_of_its_images_in_its_order(tmp_path, capsys):
    natural = tmp_path / "natural.csv"
    natural.write_text("ID,Concepts\n" + "".join(f"img_{n},Chest\n" for n in (1, 2, 3, 10, 11)), encoding="utf-8")
    folder = tmp_path / "test"
    folder.mkdir()
    for n in (11, 2, 10):
        (folder / f"img_{n}.png").write_bytes(b"never decoded")
    out = tmp_path / "cuis.csv"
    args = ["--from_natural_csv", str(natural), "--output_csv", str(out), "--image_dir", str(folder)]
    assert concepts(*args) == 0
    assert [r[0] for r in read_csv(out)[1:]] == ["img_2", "img_10", "img_11"]
    assert concepts(*args, "--limit", "2") == 0
    assert [r[0] for r in read_csv(out)[1:]] == ["img_2", "img_10"]
    (folder / "img_4.png").write_bytes(b"an image the file has no row for")
    capsys.readouterr()
    assert concepts(*args) == 2
    err = capsys.readouterr().err
    assert "has no row for 1 of the 4 images" in err and "img_4" in err and err.count("\n") == 1


def test_a_zip_with_no_auto_map_cuis_is_refused_before_the_model_loads(tmp_path, capsys):
    assert concepts("--image_dir", str(REAL_IMAGES), "--output_csv", str(tmp_path / "c.csv"), "--base_model_path",
                    str(tmp_path / "no-model"), "--no-auto_map_cuis", "--zip", str(tmp_path / "c.zip")) == 2
    err = capsys.readouterr().err
    assert err == "error: --zip packs format B, which --no-auto_map_cuis does not write: drop one of them\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("run, given", [
    (["--from_natural_csv", "{natural}"], ["--base_model_path", "foo", "--max_new_tokens", "3", "--batch_size", "7"]),
    (["--method", "knn", "--image_dir", str(REAL_IMAGES)], ["--max_new_tokens", "150", "--adapter_repo", "none"]),
    (["--method", "probe", "--image_dir", str(REAL_IMAGES)], ["--seed", "1"]),
])
def test_runs_that_generate_no_text_refuse_generation_options_given_even_at_their_default(tmp_path, capsys, run,
                                                                                         given):
    natural = tmp_path / "natural.csv"
    natural.write_text("ID,Concepts\nimg_1,Chest\n", encoding="utf-8")
    argv = [a.format(natural=natural) for a in run] + ["--output_csv", str(tmp_path / "c.csv"), *given]
    assert concepts(*argv) == 2
    err = capsys.readouterr().err
    names = ", ".join(g for g in given if g.startswith("--"))
    assert err.startswith(f"error: {names}: only for generated text; {run[0]} ") and err.count("\n") == 1
    assert not (tmp_path / "c.csv").exists()


def test_knn_with_a_format_a_file_is_refused_before_the_index_or_the_model_is_looked_for(tmp_path, capsys):
    assert concepts("--method", "knn", "--image_dir", str(REAL_IMAGES), "--output_csv", str(tmp_path / "c.csv"),
                    "--output_csv_natural", str(tmp_path / "n.csv"), "--concept_index", str(tmp_path / "no-index"),
                    "--concept_settings", str(tmp_path / "no.json"), "--base_model_path", "nobody/no-model") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --method knn writes format B only") and err.count("\n") == 1
