"""From a run to the upload: the organisers' ID order, the 2026 checks on what a run wrote, the zip."""

from __future__ import annotations

import zipfile

from conftest import REAL_IMAGES, read_csv, run_in_process, tiny_args

# Neither natural nor alphabetical: what an organisers' ID list looks like.
ORDER = ["REAL_DICOM_010", "REAL_DICOM_002", "REAL_DICOM_017", "REAL_DICOM_001", "REAL_DICOM_005"]


def write_ids(path, ids: list[str]):
    path.write_text("ID,CUIs\n" + "".join(f"{i},\n" for i in ids), encoding="utf-8")
    return path


def test_rows_follow_the_id_list_exactly_and_the_zip_holds_only_the_submission(tiny_model, tmp_path):
    out = tmp_path / "captions.csv"
    ids = write_ids(tmp_path / "ids.csv", ORDER)
    upload = tmp_path / "upload.zip"
    result = run_in_process("generate_captions.py", *tiny_args(tiny_model, out), "--ids_csv", str(ids),
                            "--zip", str(upload))
    assert result.returncode == 0, result.stderr
    assert [r[0] for r in read_csv(out)[1:]] == ORDER
    assert "accepted" in result.stderr
    assert "skipped, images not in --ids_csv: 13" in result.stderr
    with zipfile.ZipFile(upload) as z:
        assert z.namelist() == ["submission.csv"]
        assert z.read("submission.csv") == out.read_bytes()


def test_concepts_follow_the_id_list_and_pass_the_2026_check(tiny_model, tmp_path):
    out = tmp_path / "concepts.csv"
    ids = write_ids(tmp_path / "ids.csv", ORDER)
    result = run_in_process("generate_concepts.py", *tiny_args(tiny_model, out), "--ids_csv", str(ids))
    assert result.returncode == 0, result.stderr
    assert [r[0] for r in read_csv(out)[1:]] == ORDER
    assert [r[0] for r in read_csv(tmp_path / "concepts_natural.csv")[1:]] == ORDER


def test_listed_ids_without_an_image_fail_before_the_model_loads(tmp_path):
    ids = write_ids(tmp_path / "ids.csv", [*ORDER, "ImageCLEFmedical_Caption_2026_test_7", "other_3"])
    result = run_in_process("generate_captions.py", *tiny_args(tmp_path / "no-model", tmp_path / "c.csv"),
                            "--ids_csv", str(ids))
    assert result.returncode == 2
    assert "2 of the 7 IDs" in result.stderr and "ImageCLEFmedical_Caption_2026_test_7, other_3" in result.stderr
    assert "no-model" not in result.stderr


def test_shards_merged_follow_the_id_list(tiny_model, tmp_path):
    out = tmp_path / "captions.csv"
    ids = write_ids(tmp_path / "ids.csv", ORDER)
    for index in ("0", "1"):
        shard = run_in_process("generate_captions.py", *tiny_args(tiny_model, out), "--ids_csv", str(ids),
                               "--num_shards", "2", "--shard_index", index)
        assert shard.returncode == 0, shard.stderr
    merged = run_in_process("generate_captions.py", *tiny_args(tiny_model, out), "--ids_csv", str(ids),
                            "--merge_shards")
    assert merged.returncode == 0, merged.stderr
    assert [r[0] for r in read_csv(out)[1:]] == ORDER


def test_no_zip_when_the_checks_reject_the_file(tiny_model, tmp_path):
    # A file name that starts with a space makes an ID the 2026 pre-check rejects (whitespace around the ID).
    images = tmp_path / "images"
    images.mkdir()
    (images / " scan_1.png").write_bytes((REAL_IMAGES / "REAL_DICOM_001.png").read_bytes())
    upload = tmp_path / "upload.zip"
    result = run_in_process("generate_captions.py", *tiny_args(tiny_model, tmp_path / "c.csv", images),
                            "--zip", str(upload))
    assert result.returncode == 1
    assert "REJECTED" in result.stderr and not upload.exists()


def test_remapping_a_natural_csv_follows_the_id_list(tmp_path):
    natural = tmp_path / "natural.csv"
    natural.write_text("ID,Concepts\n" + "".join(f"{i},Chest\n" for i in sorted(ORDER)), encoding="utf-8")
    out = tmp_path / "concepts.csv"
    ids = write_ids(tmp_path / "ids.csv", ORDER)
    result = run_in_process("generate_concepts.py", "--from_natural_csv", str(natural), "--output_csv", str(out),
                            "--ids_csv", str(ids))
    assert result.returncode == 0, result.stderr
    assert [r[0] for r in read_csv(out)[1:]] == ORDER


def test_a_zip_name_that_is_not_a_zip_fails_before_the_run(tmp_path):
    result = run_in_process("generate_captions.py", *tiny_args(tmp_path / "no-model", tmp_path / "c.csv"),
                            "--zip", str(tmp_path / "upload.csv"))
    assert result.returncode == 2 and "must end in .zip" in result.stderr and "no-model" not in result.stderr


def test_shards_run_on_the_whole_folder_merge_into_the_id_lists_order(tiny_model, tmp_path):
    """The Submitting section's order: shards over the folder first, the ID list given at the merge."""
    out = tmp_path / "captions.csv"
    ids = write_ids(tmp_path / "ids.csv", ORDER)
    for index in ("0", "1"):
        shard = run_in_process("generate_captions.py", *tiny_args(tiny_model, out), "--num_shards", "2",
                               "--shard_index", index)
        assert shard.returncode == 0, shard.stderr
    merged = run_in_process("generate_captions.py", *tiny_args(tiny_model, out), "--ids_csv", str(ids),
                            "--merge_shards", "--zip", str(tmp_path / "upload.zip"))
    assert merged.returncode == 0, merged.stderr
    assert [r[0] for r in read_csv(out)[1:]] == ORDER and (tmp_path / "upload.zip").exists()
