"""The concept index on disk and the tables it is fitted from: a damaged index folder, a table with the wrong
columns or not in UTF-8, each one line (exit 2), never a traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import concept_index
from jjvmed import errors
from jjvmed.embeddings import Embeddings, save_embeddings
from jjvmed.tables import read_cui_lists, read_id_table

ENCODER = {"family": "timm", "name": "stand-in", "source": "timm:/models/stand-in", "pooling": "default",
           "weights": "w", "image_size": [224, 224]}
IDS = [f"img_{n}" for n in range(1, 9)]


def cli(*argv: str) -> int:
    return errors.run_cli(concept_index.main, list(argv))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Embeddings of eight images, their concepts and captions, and an index with a probe fitted from them."""
    root = tmp_path_factory.mktemp("index")
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(IDS), 8)).astype(np.float32)
    save_embeddings(root / "emb.npz", Embeddings(IDS, [vectors / np.linalg.norm(vectors, axis=1, keepdims=True)],
                                                 [ENCODER]))
    (root / "concepts.csv").write_text("ID,CUIs\n" + "".join(f"{i},C000000{n % 3};C0000009\n"
                                                              for n, i in enumerate(IDS)))
    (root / "captions.csv").write_text("ID,Caption\n" + "".join(f'{i},"chest x-ray, case {n}"\n'
                                                                 for n, i in enumerate(IDS)))
    assert cli("fit", "--embeddings", str(root / "emb.npz"), "--train_concepts", str(root / "concepts.csv"),
               "--concept_index", str(root / "index"), "--probe_epochs", "2") == 0
    return root


def damaged_copy(index: Path, to: Path, damage: str) -> Path:
    to.mkdir()
    for f in index.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    if damage == "no probe.json":
        (to / "probe.json").unlink()
    elif damage == "index.npz cut short":
        (to / "index.npz").write_bytes((to / "index.npz").read_bytes()[:3000])
    elif damage == "probe.safetensors cut short":
        (to / "probe.safetensors").write_bytes((to / "probe.safetensors").read_bytes()[:100])
    elif damage == "probe.json not JSON":
        (to / "probe.json").write_text("{")
    return to


@pytest.mark.parametrize("damage", ["no probe.json", "index.npz cut short", "probe.safetensors cut short",
                                    "probe.json not JSON"])
def test_a_damaged_index_folder_is_one_line_saying_to_fit_again(data, tmp_path, capsys, damage):
    folder = damaged_copy(data / "index", tmp_path / "index", damage)
    assert cli("tune", "--concept_index", str(folder), "--embeddings", str(data / "emb.npz"), "--valid_concepts",
               str(data / "concepts.csv"), "--concept_settings", str(tmp_path / "s.json")) == 2
    err = capsys.readouterr().err
    assert "fit" in err and str(folder) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s.json").exists()


def test_fitting_captions_from_a_concepts_file_is_refused_by_its_header(data, tmp_path, capsys):
    """Any two-column file used to pass as captions: the index then served CUIs as captions."""
    assert cli("fit", "--embeddings", str(data / "emb.npz"), "--train_captions", str(data / "concepts.csv"),
               "--concept_index", str(tmp_path / "index")) == 2
    err = capsys.readouterr().err
    assert "needs a header row with the columns ID,Caption" in err and "ID,CUIs" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "index").exists()


def test_a_table_not_in_utf8_is_one_line(data, tmp_path, capsys):
    latin1 = tmp_path / "captions.csv"
    latin1.write_bytes("ID,Caption\nimg_1,Radiografía de tórax\n".encode("latin-1"))
    assert cli("fit", "--embeddings", str(data / "emb.npz"), "--train_captions", str(latin1), "--concept_index",
               str(tmp_path / "index")) == 2
    err = capsys.readouterr().err
    assert "is not UTF-8" in err and len(err.strip().splitlines()) == 1


def test_tables_are_read_by_their_header_in_any_column_order(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("\ufeffcuis,Name,id\nc0000001; C0000002;c0000001,x,a\n,y,b\n")  # BOM, other order, any case
    assert read_id_table(table, "CUIs") == {"a": "c0000001; C0000002;c0000001", "b": ""}
    assert read_cui_lists(table) == {"a": ["C0000001", "C0000002"], "b": []}
    captions = tmp_path / "c.csv"
    captions.write_text("ID,Caption\na,Foramen Ovale, Patent\n")  # an unquoted comma in the last column
    assert read_id_table(captions, "Caption") == {"a": "Foramen Ovale, Patent"}


def test_an_index_fitted_with_captions_keeps_them_whole(data, tmp_path):
    from jjvmed.index import load_index

    assert cli("fit", "--embeddings", str(data / "emb.npz"), "--train_captions", str(data / "captions.csv"),
               "--concept_index", str(tmp_path / "index")) == 0
    index = load_index(tmp_path / "index")
    assert index.captions == [f"chest x-ray, case {n}" for n in range(len(IDS))]


def test_tuning_against_a_captions_file_is_refused_before_any_work(data, tmp_path, capsys):
    """A captions file given as the validation concepts used to tune to F1 0 and write settings."""
    headerless = tmp_path / "captions_no_header.csv"
    headerless.write_text("".join(f'{i},"chest x-ray, case {n}"\n' for n, i in enumerate(IDS)))
    for captions, expected in ((data / "captions.csv", "needs the header ID,CUIs"), (headerless, "holds no CUIs")):
        assert cli("tune", "--concept_index", str(data / "index"), "--embeddings", str(data / "emb.npz"),
                   "--valid_concepts", str(captions), "--concept_settings", str(tmp_path / "s.json")) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "s.json").exists()


def test_outputs_that_cannot_be_written_are_one_line_before_any_work(data, tmp_path, capsys):
    a_file = data / "captions.csv"
    commands = [["fit", "--embeddings", str(data / "emb.npz"), "--train_concepts", str(data / "concepts.csv"),
                 "--concept_index", str(a_file)],
                ["fit", "--embeddings", str(data / "emb.npz"), "--train_concepts", str(data / "concepts.csv"),
                 "--concept_index", str(a_file / "index")],
                ["tune", "--concept_index", str(data / "index"), "--embeddings", str(data / "emb.npz"),
                 "--valid_concepts", str(data / "concepts.csv"), "--concept_settings", str(a_file / "s.json")],
                ["tune", "--concept_index", str(data / "index"), "--embeddings", str(data / "emb.npz"),
                 "--valid_concepts", str(data / "concepts.csv"), "--concept_settings", str(tmp_path)]]
    for command in commands:
        assert cli(*command) == 2, command
        err = capsys.readouterr().err
        assert str(a_file) in err or str(tmp_path) in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert a_file.read_text().startswith("ID,Caption")
