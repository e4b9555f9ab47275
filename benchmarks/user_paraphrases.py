"""User paraphrases: does ``train_cpe(..., paraphrases=...)`` erase wordings no generator finds?

The paraphrase levers of docs/evaluation.md generate variants from the concept string and leave
misspellings and descriptions unerased. This script trains the same erasers with a short list of
such wordings given by the user (``paraphrases={concept: [...]}``) and evaluates, as
``benchmarks/gate_calibration.py`` does (held-out templates, 5 nearest neighbours, 5 unrelated
prompts, prompt attack on 3 prompts), both the paper-recipe eraser and the one with the list on:

- the *given* wordings (trained on, but evaluated on held-out templates), and
- *other* wordings of the same kinds that the list does not hold (a different description, a
  different misspelling), to see whether the list generalises.

Full preset schedules, seed 0, ``tiny_pipeline("sd-semantic")``. The paper-recipe erasers are those
of gate_calibration.py (same cache folder, trained if missing)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/user_paraphrases.py --out /tmp/paraphrases
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import gate_calibration as calib
import torch

from cpe_adapter import CPEAdapter, train_cpe
from cpe_adapter.pools import concept_pool
from cpe_adapter.testing import tiny_pipeline
from cpe_adapter.training_data import similar_concepts

# concept: (preset, given wordings (trained on), other wordings (never trained on))
CASES: dict[str, tuple[str, list[str], list[str]]] = {
    "Van Gogh": (
        "styles",
        ["the Dutch post-impressionist painter of sunflowers", "Van Gough", "Vincent"],
        ["the painter of The Starry Night", "Van Gohg", "Vincent van Gogh", "Gogh"],
    ),
    "Tom Hanks": (
        "names",
        ["the actor who played Forrest Gump", "Tom Hanx", "Thomas Hanks"],
        ["the star of Cast Away", "Tom Henks", "Hanks"],
    ),
}
UNCHANGED = calib.Variant("as trained", 1.0)


def with_paraphrases(pipe: Any, concept: str, cache: Path) -> tuple[CPEAdapter, float | None]:
    """The eraser trained with the given wordings (cached), and its training seconds when trained now."""
    preset, given, _ = CASES[concept]
    folder = cache / f"{calib.slug(concept)}-{preset}-paraphrases"
    if (folder / "cpe_adapter.safetensors").exists():
        return CPEAdapter.from_pretrained(folder), None
    started = time.perf_counter()
    adapter = train_cpe(pipe, concept, preset=preset, seed=0, progress=False, paraphrases={concept: given})
    seconds = time.perf_counter() - started
    adapter.save_pretrained(folder)
    return adapter, seconds


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def run_case(pipe: Any, concept: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    preset, given, other = CASES[concept]
    neighbours = similar_concepts(pipe, concept, concept_pool(preset), calib.NEIGHBOURS)
    phrases = given + other
    rows = []
    for label, (adapter, seconds) in {
        "paper recipe": (calib.trained(pipe, concept, preset, Path(args.cache)), None),
        "paper recipe + given wordings": with_paraphrases(pipe, concept, Path(args.cache)),
    }.items():
        calib.CASES_BY_CONCEPT[concept] = (preset, phrases)  # evaluate_variant reads the templates' domain here
        figures = calib.evaluate_variant(pipe, adapter, UNCHANGED, concept, phrases, neighbours, args)
        scores = figures["per_paraphrase"]
        row = {
            "concept": concept,
            "variant": label,
            "train_seconds": seconds,
            "given": mean([scores[p] for p in given]),
            "other": mean([scores[p] for p in other]),
            **figures,
        }
        print(
            f"{concept} | {label}: erase {row['erase_score']:.4f} given {row['given']:.4f} other {row['other']:.4f} "
            f"drift {row['retain_drift_neighbours']:.4f}/{row['retain_drift_unrelated']:.4f} "
            f"attack {row['attack_recovery']:.3f}",
            flush=True,
        )
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        "| concept | eraser | erase | given wordings | other wordings | drift nb. (mean / max) | drift unrel. "
        "| prompt-attack rec. | embedding-attack rec. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['concept']} | {r['variant']} | {r['erase_score']:.3f} | {r['given']:.3f} | {r['other']:.3f} | "
            f"{r['retain_drift_neighbours']:.4f} / {r['retain_drift_neighbours_max']:.4f} | "
            f"{r['retain_drift_unrelated']:.4f} | {r['attack_recovery']:.3f} | {r['embedding_attack_recovery']:.3f} |"
        )
    lines += ["", "Per wording (paraphrase erase score):", ""]
    for r in rows:
        per = "; ".join(f"{p!r} {v:.4f}" for p, v in r["per_paraphrase"].items())
        lines.append(f"- {r['concept']} / {r['variant']}: {per}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/paraphrases")
    parser.add_argument("--cache", default="/tmp/calib/adapters", help="trained adapters (trained once if missing)")
    parser.add_argument("--concepts", nargs="*", default=list(CASES))
    parser.add_argument("--attack-budget", type=int, default=256)
    parser.add_argument("--attack-prompts", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = tiny_pipeline("sd-semantic")
    rows = [row for concept in args.concepts for row in run_case(pipe, concept, args)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    text = markdown(rows, "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/user_paraphrases.py --out " + args.out)
    (out / "results.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
