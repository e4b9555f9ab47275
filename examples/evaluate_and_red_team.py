"""Prove an eraser works and keeps everything else, and look for its holes.

python examples/evaluate_and_red_team.py --adapter outputs/erase-style
"""

from __future__ import annotations

import argparse

import cpe_adapter
from cpe_adapter.cli import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tiny:sd-semantic")
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--erased", default="Van Gogh")
    parser.add_argument("--paraphrase", action="append", help="another way to say the erased concept (repeatable)")
    parser.add_argument("--retained", action="append", help="a concept that must be kept (repeatable)")
    parser.add_argument("--out", default="outputs/eval")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    # Defaults for the built-in example (Van Gogh); given values replace them, never add to them.
    paraphrases = args.paraphrase or (["Vincent van Gogh"] if args.erased == "Van Gogh" else [])
    retained = args.retained or ["Claude Monet", "Rembrandt", "a red car"]

    pipe = load_pipeline(args.base, args.device)
    pipe.load_cpe_adapter(args.adapter)
    report = cpe_adapter.evaluate(
        pipe,
        [args.erased],
        [r for r in retained if r != args.erased],
        paraphrases={args.erased: paraphrases} if paraphrases else None,
        attack=True,
        images=True,
    )
    report.save(args.out)
    print(report.to_markdown())


if __name__ == "__main__":
    main()
