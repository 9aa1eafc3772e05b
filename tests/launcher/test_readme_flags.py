"""The README documents every `zeroserve serve` flag, as the parser has it."""

import os

from zeroserve.launcher.readme_flags import END, START, render, serve_parser

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def test_readme_flag_table_matches_the_parser():
    with open(README) as f:
        text = f.read()
    section = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert section == render(), "run: python -m zeroserve.launcher.readme_flags README.md"
    for action in serve_parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert f"`{flag}" in section, flag
