"""``cpe-adapter demo``: the whole life of an eraser on a built-in tiny pipeline, offline.

Train an eraser for a painter, save it, reload it into a fresh pipeline, stack a second eraser
(a public figure), and print before/after figures: erasure of the targets, drift of other concepts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

DEMO_STYLE = "Van Gogh"
DEMO_STYLE_PARAPHRASES = ["Vincent van Gogh"]
DEMO_NAME = "Taylor Swift"
DEMO_STEPS = 600
# A short schedule so the demo takes about a minute on 2 CPU cores: two stages (one adversarial),
# 10 similar-name anchors and 8 templates instead of the presets' 50 and ~40.
DEMO_OVERRIDES = {"stages": 2, "similar_anchors": 10}
DEMO_TEMPLATES = 8


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def run_demo(
    out_dir: str | Path = "outputs/demo", steps: int | None = None, progress: bool = True, kind: str = "sd-semantic"
) -> dict[str, Any]:
    """Run the demo; returns the figures (and a ``text`` summary for printing)."""
    from .evaluation import evaluate
    from .loaders import load_cpe_adapter, set_cpe_adapters
    from .pools import concept_pool, templates
    from .report import MissingExtraError
    from .testing import MissingSemanticEncoderError, tiny_pipeline
    from .training import train_cpe

    out = Path(out_dir)
    steps = DEMO_STEPS if steps is None else steps
    started = time.perf_counter()
    notes: list[str] = []
    try:
        pipe = tiny_pipeline(kind)
    except MissingSemanticEncoderError as err:
        if kind != "sd-semantic":
            raise
        kind, pipe = "sd", tiny_pipeline("sd")
        notes.append(f"note: {err}; ran on tiny_pipeline('sd'), whose random text encoder gives the figures no meaning")
    iterations = f"{steps} erase iteration{'s' if steps != 1 else ''}"
    lines = [f"cpe-adapter demo on tiny_pipeline({kind!r}): a short schedule, {iterations} per concept"]

    short = {"steps": steps, "progress": progress, **DEMO_OVERRIDES}
    style = train_cpe(pipe, DEMO_STYLE, preset="styles", templates=templates("styles")[:DEMO_TEMPLATES], **short)
    style.save_pretrained(out / "erase-vangogh")
    name = train_cpe(pipe, DEMO_NAME, preset="names", templates=templates("names")[:DEMO_TEMPLATES], **short)
    name.save_pretrained(out / "erase-taylor-swift")
    trained = time.perf_counter() - started
    lines.append(f"trained 2 erasers in {trained:.1f} s; saved to {out}")

    fresh = tiny_pipeline(kind)
    load_cpe_adapter(fresh, out / "erase-vangogh", adapter_name="vangogh")
    neighbours = [p for p in concept_pool("styles") if "gogh" not in p.lower()][:5]
    unrelated = ["a red car parked on a street", "a bowl of fruit on a table"]
    single = evaluate(
        fresh,
        [DEMO_STYLE],
        neighbours + unrelated,
        paraphrases={DEMO_STYLE: DEMO_STYLE_PARAPHRASES},
        attack=False,
        progress=progress,
    ).to_dict()

    load_cpe_adapter(fresh, out / "erase-taylor-swift", adapter_name="taylor")
    set_cpe_adapters(fresh, ["vangogh", "taylor"], scales=[1.0, 1.0])
    stacked_report = evaluate(
        fresh,
        [DEMO_STYLE, DEMO_NAME],
        neighbours + unrelated + ["Barack Obama"],
        attack=True,
        progress=progress,
        attack_budget=128,
        embedding_steps=30,
    )
    try:
        stacked_report.save(out / "report")
    except MissingExtraError as err:  # report.json and report.md are written first
        notes.append(f"plots skipped: {err}")
    stacked = stacked_report.to_dict()
    seconds = time.perf_counter() - started

    lines += [
        "",
        "reloaded 'vangogh' into a fresh pipeline:",
        f"  erase_score on {DEMO_STYLE!r}: {_fmt(single['erase_score'])} (0 = untouched, 1 = reached the target)",
        f"  paraphrase_erase_score ({DEMO_STYLE_PARAPHRASES[0]!r}): {_fmt(single.get('paraphrase_erase_score'))}",
        f"  retain_drift on {len(neighbours)} other painters + {len(unrelated)} unrelated prompts: "
        f"{_fmt(single['retain_drift'])} (0 = untouched)",
        "",
        "stacked 'vangogh' + 'taylor':",
    ]
    for concept, figures in stacked["per_concept"].items():
        if "erase_score" in figures:
            lines.append(f"  {concept!r}: erase_score {_fmt(figures['erase_score'])}")
    lines += [
        f"  retain_drift: {_fmt(stacked['retain_drift'])}",
        f"  attack_recovery (prompt attack): {_fmt(stacked.get('attack_recovery'))}",
        f"  embedding_attack_recovery: {_fmt(stacked.get('embedding_attack_recovery'))}",
        f"report: {out / 'report'}/report.md; done in {seconds:.1f} s",
        *notes,
    ]
    return {
        "kind": kind,
        "out": str(out),
        "notes": notes,
        "single": single,
        "stacked": stacked,
        "seconds": round(seconds, 2),
        "text": "\n".join(lines),
    }
