"""Keep the README's table of `zeroserve serve` flags equal to the parser.

    python -m zeroserve.launcher.readme_flags README.md   # rewrite the section in place
A test checks that the section matches (tests/launcher/test_readme_flags.py).
"""

from __future__ import annotations

import argparse
import sys

START, END = "<!-- serve-flags:start -->", "<!-- serve-flags:end -->"


def serve_parser() -> argparse.ArgumentParser:
    from zeroserve.launcher.engine_args import add_engine_args

    parser = argparse.ArgumentParser(prog="zeroserve serve")
    add_engine_args(parser)
    return parser


def default_cell(action: argparse.Action) -> str:
    value = action.default
    if value is None or value == [] or action.nargs == 0:  # switches say what they do in words
        return ""
    if isinstance(value, tuple):
        value = " ".join(map(str, value))  # as it is typed
    return f"`{value}`"


def render() -> str:
    from zeroserve.launcher.engine_args import DEFAULT_NOTE

    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for action in serve_parser()._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = ", ".join(action.option_strings) or action.dest.upper()
        if action.metavar and action.option_strings:
            name += " " + (" ".join(action.metavar) if isinstance(action.metavar, tuple) else action.metavar)
        elif action.nargs != 0 and action.option_strings:
            name += f" {action.dest.upper()}"
        help_text = (action.help or "").removesuffix(DEFAULT_NOTE).replace("|", "\\|")
        if action.choices:
            help_text += f" (one of: {', '.join(map(str, action.choices))})"
        rows.append(f"| `{name}` | {default_cell(action)} | {help_text} |")
    return "\n".join(rows)


def rewrite(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{render()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    path = (argv or sys.argv[1:] or ["README.md"])[0]
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(rewrite(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
