"""Upload a trained eraser to the Hugging Face Hub with a generated model card.

huggingface-cli login
python examples/push_to_hub.py outputs/erase-style my-org/erase-vangogh --private
"""

from __future__ import annotations

import argparse

from cpe_adapter import CPEAdapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("repo_id")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args()

    adapter = CPEAdapter.from_pretrained(args.folder)
    url = adapter.push_to_hub(args.repo_id, private=args.private)
    print(f"pushed {adapter.config.concept_names} to {args.repo_id}: {url}")


if __name__ == "__main__":
    main()
