"""MkDocs hook: render the command-line reference from the argparse parsers at build time.

``docs/cli.md`` holds the marker below; the hook replaces it with the help of ``deeplab`` and of
every subcommand, formatted by argparse itself from ``deeplab.cli.build_parser()``, so the page
cannot drift from the options the tool accepts. ``tests/test_docs.py`` calls
:func:`render_cli_reference` too, to check the page's anchors and the examples in the help.
"""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager

MARKER = "<!-- cli-reference -->"
#: argparse wraps at the terminal's width; a fixed one keeps the page the same on every machine.
HELP_WIDTH = 80


@contextmanager
def _columns(width: int):
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def subcommand_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommand parsers of ``parser``, by name, in the order they were added."""
    for action in parser._actions:  # argparse keeps no public list of its subparsers
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def render_cli_reference() -> str:
    """Markdown for every subcommand: a heading ``deeplab NAME``, its summary and its ``--help``."""
    from deeplab.cli import _COMMANDS, build_parser

    with _columns(HELP_WIDTH):
        parser = build_parser()
        subs = subcommand_parsers(parser)
        out = ["| command | what it does |", "|---|---|"]
        for name in subs:
            out.append(f"| [`deeplab {name}`](#deeplab-{name}) | {_COMMANDS[name][1]} |")
        out += ["", "## deeplab", "", "```text", parser.format_help().rstrip(), "```", ""]
        for name, sub in subs.items():
            out += [f"## deeplab {name}", "", _COMMANDS[name][1][0].upper() + _COMMANDS[name][1][1:] + ".",
                    "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs' signature)
    if MARKER in markdown:
        return markdown.replace(MARKER, render_cli_reference())
    return markdown
