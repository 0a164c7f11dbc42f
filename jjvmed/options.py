"""Command-line manners every script shares: one parser class, and the options that mean the same
thing everywhere, written once.

- A mistyped option gets a suggestion (`--imagedir`, `--image-dir` -> `--image_dir`), not only argparse's
  "unrecognized arguments".
- Renamed options keep working for a release: the old spelling is rewritten to the new one with one
  deprecation line on stderr, and stays out of --help.
- Prefixes of an option are not accepted: `--image` for `--image_dir` reads like a typo, and a new
  option must never change what an old command line means.
"""

from __future__ import annotations

import argparse
import difflib
import sys

DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("auto", "bfloat16", "float16", "float32")


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser with typo suggestions and deprecated spellings (see the module docstring).
    Subcommands made with `add_subparsers` are Parsers too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.renamed: dict[str, str] = {}

    def rename(self, old: str, new: str) -> None:
        """Accept `old` (e.g. '--ids') as a deprecated spelling of the option `new` ('--ids_csv')."""
        self.renamed[old] = new

    def parse_known_args(self, args=None, namespace=None):
        args = self.rewrite_renamed(list(sys.argv[1:] if args is None else args))
        self.seen = args
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        """argparse's error; a mistyped option also gets its suggestion when another error comes first
        (a required option reported missing because its name was mistyped)."""
        if "unrecognized arguments" not in message:
            known = self.all_option_names()
            unknown = [a for a in getattr(self, "seen", []) if a.startswith("--") and a.partition("=")[0] not in known]
            if unknown:
                message = f"{message}; {unrecognized(unknown, known).removeprefix('unrecognized arguments: ')}"
        super().error(message)

    def rewrite_renamed(self, args: list[str]) -> list[str]:
        out = []
        for arg in args:
            name, eq, value = arg.partition("=")
            if name in self.renamed:
                new = self.renamed[name]
                print(f"warning: {name} is deprecated and will be removed; use {new}", file=sys.stderr)
                arg = new + eq + value
            out.append(arg)
        return out

    def given(self) -> list[str]:
        """The dests of the options on the last parsed command line, in its order, whatever their values: an
        option given with its default value is given too (`--max_new_tokens 100` where 100 is the default)."""
        dests = {option: action.dest for action in self._actions for option in action.option_strings}
        named = (dests.get(arg.partition("=")[0]) for arg in getattr(self, "seen", []))
        return list(dict.fromkeys(d for d in named if d))

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(unrecognized(extras, self.all_option_names()))
        return parsed

    def all_option_names(self) -> list[str]:
        """Every option string of this parser and its subcommands."""
        names = []
        for action in self._actions:
            names += [s for s in action.option_strings if s.startswith("--")]
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    names += sub.all_option_names() if isinstance(sub, Parser) else []
        return sorted(set(names))


def unrecognized(extras: list[str], known: list[str]) -> str:
    """argparse's message for unknown arguments, with the closest known option for each mistyped one."""
    hints = []
    for arg in extras:
        name = arg.partition("=")[0]
        if not name.startswith("-"):
            continue
        guess = suggestion(name, known)
        if guess:
            hints.append(f"{name}: did you mean {guess}?")
    message = f"unrecognized arguments: {' '.join(extras)}"
    if len(hints) == 1:
        return f"{message} ({hints[0].partition(': ')[2]})"
    return message + (f" ({'; '.join(hints)})" if hints else "")


def suggestion(name: str, known: list[str]) -> str | None:
    """The known option a mistyped `name` most likely meant: same letters with - and _ mixed up, or close."""
    def key(option: str) -> str:
        return option.lstrip("-").replace("-", "_").lower()

    for option in known:
        if key(option) == key(name) or key(option).replace("_", "") == key(name).replace("_", ""):
            return option
    starting = [o for o in known if key(o).startswith(key(name))]
    if len(starting) == 1:
        return starting[0]
    close = difflib.get_close_matches(key(name), [key(o) for o in known], n=1, cutoff=0.75)
    return next((o for o in known if close and key(o) == close[0]), None)


def add_device_options(group, what: str = "the model", auto: str = "the GPU if CUDA is present, else the CPU"
                       ) -> None:
    """--device and --dtype, with one meaning in every script."""
    group.add_argument("--device", choices=DEVICES, default="auto",
                       help=f"where {what} runs; auto: {auto} (default: %(default)s)")
    group.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="weights dtype; auto = bfloat16 on GPUs that support it, float16 on older ones, "
                       "float32 on CPU (default: %(default)s)")
