"""Regenerate docs/cli.md from the argument parser: ``python docs/scripts/gen_cli_reference.py``."""

from __future__ import annotations

import argparse
from pathlib import Path

from cpe_adapter.cli import build_parser

INTRO = """# CLI reference

`cpe-adapter` is installed with the package (`python -m cpe_adapter` works too). Every
sub-command accepts `--help` and `--json` (one machine-readable JSON object on stdout). Exit codes:
0 success, 2 bad input (one-line reason on stderr), 1 any other failure.

`MODEL` is a Hub id, a local folder in diffusers layout, or `tiny:<kind>` for the built-in offline
pipelines (`tiny:sd`, `tiny:sd2`, `tiny:sdxl`, `tiny:sd-semantic`).
"""


def cli_reference() -> str:
    """The Markdown CLI reference: the intro and every sub-command's ``--help`` text."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = [INTRO]
    for name, sub in commands.choices.items():
        sub.prog = f"cpe-adapter {name}"
        sub.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=100)
        parts.append(f"## `cpe-adapter {name}`\n\n```text\n{sub.format_help().rstrip()}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    target = Path(__file__).resolve().parents[1] / "cli.md"
    target.write_text(cli_reference(), encoding="utf-8")
    print(f"wrote {target}")
