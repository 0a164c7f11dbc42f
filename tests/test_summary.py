"""The summary every run ends with says what is true: where the time went (loading, each step, and a rate
only of work that was done), every file the run keeps, and what a zip was checked against."""

from __future__ import annotations

import re

from conftest import read_csv, run_in_process
from test_rerank import IMAGES, best_of_n
from test_retrieval_captions import captions_run, data, generating, index_cli, tiny  # noqa: F401 (data: a fixture)
from tiny_encoders import save_hf_clip


def time_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("time: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_rerank_only_resume_gives_no_rate_of_generation_and_times_the_reranking(tiny_model, tmp_path):
    first, second = save_hf_clip(tmp_path / "a", seed=0), save_hf_clip(tmp_path / "b", seed=1)
    out = tmp_path / "captions.csv"
    generated = best_of_n(tiny_model, out, "--candidates", "2", "--rerank_model", str(first))
    assert generated.returncode == 0, generated.stderr
    assert re.search(r"s reranking\), [\d.]+ images/s while generating", time_line(generated.stderr))
    again = best_of_n(tiny_model, out, "--candidates", "2", "--rerank_model", str(second),
                      "--resume_from_checkpoint", "auto")
    assert again.returncode == 0, again.stderr
    line = time_line(again.stderr)
    assert f"scored now: {IMAGES}" in line and re.search(r"s loading, [\d.]+ s reranking\)", line)
    assert "images/s" not in line  # nothing was generated: no rate of generation at all


def test_rag_times_the_embedding_of_its_images_apart_and_names_its_embeddings_file(data, tiny_model,  # noqa: F811
                                                                                      tmp_path):
    out = tmp_path / "rag.csv"
    args = ["--method", "rag", "--concept_index", str(data / "index"), "--image_dir", str(data / "held_out"),
            "--output_csv", str(out), "--limit", "2", *generating(tiny_model)]
    result = captions_run(*args)
    assert result.returncode == 0, result.stderr
    line = time_line(result.stderr)
    assert re.search(r"s loading, [\d.]+ s embedding 2 images\), [\d.]+ images/s while generating", line)
    assert f"embeddings: {tmp_path / 'rag.embeddings.npz'}" in result.stderr
    assert f"journal: {tmp_path / 'rag.journal.jsonl'}" in result.stderr


def test_knn_captions_from_a_file_give_no_rate_and_time_the_search(data, tiny_model, tmp_path):  # noqa: F811
    emb = tmp_path / "held_out.npz"
    assert index_cli("embed", "--image_dir", str(data / "held_out"), "--embeddings", str(emb),
                     *tiny(tiny_model)) == 0
    result = captions_run("--method", "knn", "--concept_index", str(data / "index"), "--embeddings", str(emb),
                          "--output_csv", str(tmp_path / "knn.csv"))
    assert result.returncode == 0, result.stderr
    line = time_line(result.stderr)
    assert re.search(r"s searching\)", line) and "images/s" not in line, line


def test_a_zip_written_without_an_id_list_says_it_was_checked_against_its_own_rows(tmp_path):
    natural = tmp_path / "natural.csv"
    natural.write_text("ID,Concepts\nimg_1,Chest\nimg_2,\nimg_3,Chest\n", encoding="utf-8")
    args = ["--from_natural_csv", str(natural), "--output_csv", str(tmp_path / "cuis.csv")]
    alone = run_in_process("generate_concepts.py", *args, "--zip", str(tmp_path / "alone.zip"))
    assert alone.returncode == 0, alone.stderr
    assert ("note: the zip was checked against its own 3 rows; give --ids_csv to check against the test set's ID "
            "list") in alone.stderr
    (tmp_path / "ids.csv").write_text("ID,CUIs\nimg_3,\nimg_1,\nimg_2,\n", encoding="utf-8")
    listed = run_in_process("generate_concepts.py", *args, "--zip", str(tmp_path / "listed.zip"),
                            "--ids_csv", str(tmp_path / "ids.csv"))
    assert listed.returncode == 0, listed.stderr
    assert "its own" not in listed.stderr
    assert [r[0] for r in read_csv(tmp_path / "cuis.csv")[1:]] == ["img_3", "img_1", "img_2"]
