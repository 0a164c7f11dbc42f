"""concept_index.py tune_captions reads journals a user may have edited: a damaged header is one line."""

from __future__ import annotations

import pytest

from jjvmed.caption_tuning import journal_contenders
from jjvmed.errors import UserError
from jjvmed.journal import header_line, record_line
from jjvmed.records import Record


@pytest.mark.parametrize("settings", [
    {"task": "caption", "generation": {"num_return_sequences": "four"}},
    {"task": "caption", "generation": {}, "retrieval": {"k": 2}},
    {"task": "caption", "generation": {}, "retrieval": {"neighbours": [3]}},
])
def test_a_journal_header_with_unreadable_settings_is_one_line(tmp_path, settings):
    journal = tmp_path / "rag.journal.jsonl"
    journal.write_bytes(header_line(settings, str(tmp_path)) + record_line(Record("img_1", "a caption"), [1, 2, 3]))
    with pytest.raises(UserError, match="its header's settings cannot be read"):
        journal_contenders(journal)


def test_a_journal_of_a_plain_run_is_one_contender_with_its_captions(tmp_path):
    journal = tmp_path / "plain.journal.jsonl"
    journal.write_bytes(header_line({"task": "caption", "generation": {}}, str(tmp_path))
                        + record_line(Record("img_1", "Caption: a chest X-ray."), [1, 2, 3]))
    (contender,) = journal_contenders(journal)
    assert contender.options == "--method generate" and contender.captions == {"img_1": "a chest X-ray."}


def test_a_captions_csv_given_as_a_journal_is_one_line_naming_the_journal_to_give(tmp_path):
    captions = tmp_path / "valid_rag.csv"
    captions.write_text("ID,Caption\nimg_1,a chest X-ray\n")
    with pytest.raises(UserError, match="give the run's <output stem>.journal.jsonl") as caught:
        journal_contenders(captions)
    assert "move it away" not in str(caught.value)
