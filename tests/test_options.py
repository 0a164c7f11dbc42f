"""Every script's options, read from the parsers: one name per meaning across all scripts, help for every
option and a description for every command, and the README's table of them kept in step.

    python tests/test_options.py     # rewrites the README's options table from the parsers
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import concept_index  # noqa: E402
import evaluate  # noqa: E402
import finetune  # noqa: E402
import generate_captions  # noqa: E402
import generate_concepts  # noqa: E402

SCRIPTS = {"generate_captions.py": generate_captions, "generate_concepts.py": generate_concepts,
           "concept_index.py": concept_index, "evaluate.py": evaluate, "finetune.py": finetune}

# Names that meant the same thing in one script or another. Each group is one meaning: only one of its
# names may be an option anywhere (the others are old spellings the parsers rewrite, with a warning).
SAME_MEANING = [
    {"--ids_csv", "--ids"},
    {"--output_csv", "--output", "--out"},
    {"--concept_index", "--index_dir"},
    {"--concept_settings", "--settings"},
    {"--gt_manual", "--valid_manual"},
    {"--gt", "--concepts_gt", "--captions_gt"},
    {"--pred", "--concepts_pred", "--captions_pred"},
    {"--embeddings", "--train_embeddings", "--valid_embeddings"},
    {"--generated", "--valid_generated"},
    {"--train_captions", "--captions_csv"},
    {"--train_concepts", "--concepts_csv"},
    {"--valid_captions", "--valid_captions_csv"},
    {"--valid_concepts", "--valid_concepts_csv"},
    {"--neighbours", "--k"},
]
TABLE_START, TABLE_END = "<!-- options table: start -->", "<!-- options table: end -->"


def commands() -> dict[str, argparse.ArgumentParser]:
    """'script' or 'script subcommand' -> its parser."""
    out = {}
    for script, module in SCRIPTS.items():
        parser = module.build_parser()
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs:
            out.update({f"{script} {name}": sub for name, sub in subs[0].choices.items()})
        else:
            out[script] = parser
    return out


def options() -> dict[str, dict[str, str]]:
    """option -> {command: help} for every option of every command (--help left out)."""
    found: dict[str, dict[str, str]] = {}
    for command, parser in commands().items():
        for action in parser._actions:
            for name in action.option_strings:
                if name.startswith("--") and name != "--help" and not name.startswith("--no-"):
                    found.setdefault(name, {})[command] = action.help or ""
    return found


def first_clause(text: str) -> str:
    """The help's first clause: up to the first '; ' or sentence end outside parentheses (a cut inside one
    would leave it unclosed), defaults left out."""
    try:
        text = text % {"default": ""}  # argparse's %(default)s, and %% for a percent sign
    except (KeyError, ValueError, TypeError):
        pass
    text = re.sub(r"\s*\(default:[^)]*\)", "", text).strip()
    depth = 0
    for n, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and re.match(r";\s|\.\s+[A-Z(]", text[n:]):
            text = text[:n]
            break
    return text.replace("|", "/")


def table() -> str:
    """One row per option and wording of its help: where two commands say different things of one option (its
    meaning is one, the details differ), each gets its own row."""
    rows = ["| option | where | what it is |", "|---|---|---|"]
    for name, where in sorted(options().items()):
        by_help: dict[str, list[str]] = {}
        for command, text in where.items():
            by_help.setdefault(first_clause(text), []).append(command)
        for text, commands in sorted(by_help.items(), key=lambda item: sorted(item[1])):
            rows.append(f"| `{name}` | {', '.join(sorted(commands))} | {text} |")
    return "\n".join(rows)


def test_one_name_per_meaning_across_every_script():
    names = set(options())
    for group in SAME_MEANING:
        used = sorted(group & names)
        assert len(used) <= 1, f"{' and '.join(used)} mean the same thing: keep one, rename the others"


def test_every_option_has_help_and_every_command_a_description():
    for command, parser in commands().items():
        assert parser.description, f"{command} has no description"
        for action in parser._actions:
            if action.option_strings and action.help is None:
                raise AssertionError(f"{command} {action.option_strings[0]} has no help")


def test_the_table_never_cuts_a_help_text_inside_parentheses():
    for row in table().splitlines()[2:]:
        what = row.rsplit(" | ", 1)[1]
        assert what.count("(") == what.count(")"), row


def test_the_readme_table_lists_every_option_of_every_script():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert TABLE_START in readme and TABLE_END in readme
    shown = readme.split(TABLE_START)[1].split(TABLE_END)[0].strip()
    assert shown == table(), "the README's options table is stale: run python tests/test_options.py"


if __name__ == "__main__":
    path = ROOT / "README.md"
    readme = path.read_text(encoding="utf-8")
    before, rest = readme.split(TABLE_START)
    after = rest.split(TABLE_END)[1]
    path.write_text(f"{before}{TABLE_START}\n{table()}\n{TABLE_END}{after}", encoding="utf-8")
    print(f"rewrote the options table in {path}")
