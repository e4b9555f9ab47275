"""Post-hoc gate calibration: does rescaling or re-thresholding a trained gate widen erasure to paraphrases?

The gate of concept ``c`` on token ``t`` is ``g = sigmoid(l)`` with ``l = (S E)[t] . v_c`` (docs/concepts.md).
Without retraining, two levers change it:

- **sharpening** ``g' = sigmoid(k l)``: the adapter's ``gate_v`` multiplied by ``k`` (no format change);
  ``k`` is either fixed (2, 4) or chosen so that the largest gate over the *training anchors* (the
  domain's general words and the 50 most similar pool concepts, in a few training templates, plus
  ``""``) equals ``eps``;
- **threshold** ``g' = sigmoid(k (l - tau))`` with ``tau`` from the anchor logits. The adapter format
  has no gate bias, so this is emulated here only, by wrapping the routing function the runtime
  calls (since every row of ``S`` sums to one, ``S (k E v - k tau) = k (l - tau)``).

Two erasers are trained once on ``tiny_pipeline("sd-semantic")`` with the default presets and seed 0
("Van Gogh", styles; "Tom Hanks", names) and cached. Every variant is evaluated with
:func:`cpe_adapter.evaluation.evaluate` on the held-out templates: erase score, held-out paraphrase
erase score (overall and per paraphrase) and its ratio to the erase score, retain drift on the 5 most
similar pool concepts and on 5 unrelated prompts, prompt-attack and embedding-attack recovery.
Also reported: the largest anchor gate and the mean largest token gate of each paraphrase.

Writes ``results.json`` and ``results.md`` into ``--out`` and prints the table::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gate_calibration.py --out /tmp/calib
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import cpe_adapter.gate as cpe_gate
from cpe_adapter import CPEAdapter
from cpe_adapter.evaluation import evaluate
from cpe_adapter.gate import GATE_CHUNK, _route, token_mixing
from cpe_adapter.loaders import load_cpe_adapter, unload_cpe_adapter
from cpe_adapter.pools import concept_pool, general_words, templates
from cpe_adapter.testing import tiny_pipeline
from cpe_adapter.training import train_cpe
from cpe_adapter.training_data import similar_concepts

# (concept, preset, held-out paraphrases: never in any training set)
CASES: list[tuple[str, str, list[str]]] = [
    (
        "Van Gogh",
        "styles",
        ["Vincent van Gogh", "Van Gough", "the Dutch post-impressionist painter of sunflowers", "Gogh"],
    ),
    ("Tom Hanks", "names", ["Thomas Hanks", "Tom Hanx", "the actor who played Forrest Gump", "Hanks"]),
]
# everyday prompts used whole (template "{}"); the unrelated set of benchmarks/eval_quality.py
UNRELATED: list[str] = [
    "a red car parked on a quiet street",
    "a bowl of fruit on a wooden table",
    "a dog running on the beach",
    "a snowy mountain at sunrise",
    "a cup of coffee next to a laptop",
]
SIMILAR_ANCHORS = 50  # pool concepts the training anchors on (docs/training.md)
NEIGHBOURS = 5
FLOORS: dict[str, tuple[str, float]] = {
    "retain_drift_neighbours": ("<=", 0.01),
    "retain_drift_unrelated": ("<=", 0.005),
    "attack_recovery": ("<=", 0.3),
    "ratio": (">=", 0.8),
}


@dataclass(frozen=True)
class Variant:
    """One calibration: ``g' = sigmoid(k (l - tau))``; ``tau`` None means sharpening via ``gate_v``."""

    name: str
    k: float
    tau: float | None = None
    rule: str = ""


# ------------------------------------------------------------------------------ gate statistics
def slug(text: str) -> str:
    return "-".join("".join(ch if ch.isalnum() else " " for ch in text.lower()).split())


def encode(pipe: Any, prompts: Sequence[str], batch: int = 64) -> torch.Tensor:
    """Prompt embeddings ``[B, T, d]`` exactly as the pipeline (and the evaluation probe) makes them."""
    parts = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            out = pipe.encode_prompt(
                prompt=list(prompts[start : start + batch]),
                device="cpu",
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
            parts.append(out[0].float())
    return torch.cat(parts)


def gate_logits(adapter: CPEAdapter, embeds: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Gate logits ``l = (S E) v`` of concept 0 for every token: ``[B, T, d] -> [B, T]``."""
    rows = []
    with torch.no_grad():
        for start in range(0, embeds.shape[0], batch):
            part = embeds[start : start + batch]
            mixing = token_mixing(part, adapter.gate_a[:1], adapter.key_weight()[:1])[0]
            projected = part @ adapter.gate_v[0]
            rows.append((mixing @ projected.unsqueeze(-1)).squeeze(-1))
    return torch.cat(rows)


def anchor_prompts(pipe: Any, concept: str, preset: str, count: int) -> list[str]:
    """The training anchors (general words + most similar pool concepts) in ``count`` training templates, and ``""``."""
    words = general_words(preset) + similar_concepts(pipe, concept, concept_pool(preset), SIMILAR_ANCHORS)
    chosen = templates(preset)[:count]
    return [template.format(word) for word in words for template in chosen] + [""]


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


# ---------------------------------------------------------------------------- the calibrations
def variants(anchor_logits: torch.Tensor) -> list[Variant]:
    """Every calibration to evaluate, ``k`` and ``tau`` derived from ``anchor_logits`` (every token of every anchor)."""
    top = float(anchor_logits.max())
    found = [Variant("uncalibrated", 1.0, None, "baseline")]
    for eps in (0.05, 0.01, 0.001):
        if top < 0:  # sigmoid(k * top) = eps
            k = logit(eps) / top
            found.append(Variant(f"sharpen max-anchor={eps:g}", k, None, f"k = logit({eps:g}) / max anchor logit"))
    for k in (2.0, 4.0):
        found.append(Variant(f"sharpen k={k:g}", k, None, "fixed k"))
    quantiles = {q: float(torch.quantile(anchor_logits.flatten(), q)) for q in (0.999, 0.99)}
    # above every anchor token (a steeper gate that opens nothing the anchors reach), then two
    # placements that open the top 0.1 % / 1 % of anchor tokens (the only way to open anything below)
    placements = [
        ("max anchor + 0.5", top + 0.5, (4.0, 8.0)),
        ("q99.9 anchor", quantiles[0.999], (4.0,)),
        ("q99 anchor", quantiles[0.99], (4.0, 8.0)),
    ]
    for label, tau, slopes in placements:
        for k in slopes:
            found.append(Variant(f"threshold {label}, k={k:g}", k, tau, f"tau = {label}"))
    # not a calibration: every gate forced to 1, the ceiling of what any gate change can reach
    found.append(Variant("ceiling: every gate open (g = 1)", 1.0, -1e4, "diagnostic upper bound"))
    return found


_BIAS: dict[str, float] = {}  # k, tau and a call count of the active threshold variant


def _biased_best_concepts(
    embeds: torch.Tensor,
    gate_a: torch.Tensor,
    gate_b: torch.Tensor | None,
    gate_v: torch.Tensor,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`cpe_adapter.gate.best_concepts` with ``sigmoid(k (l - tau))``: ``E v`` replaced by ``k (E v - tau)``."""
    _BIAS["calls"] += 1
    batch, tokens, dim = embeds.shape
    flat = embeds.reshape(batch * tokens, dim)
    projected = _BIAS["k"] * (flat @ gate_v.T - _BIAS["tau"])
    return _route(embeds, flat, gate_a, gate_b, projected, chunk or GATE_CHUNK)


@contextlib.contextmanager
def calibrated(pipe: Any, base: CPEAdapter, variant: Variant) -> Iterator[CPEAdapter]:
    """The pipeline with ``base`` calibrated by ``variant`` loaded as "eraser" (unloaded and unpatched after)."""
    adapter = copy.deepcopy(base)
    original = cpe_gate.best_concepts
    # every cpe_adapter module that imported the routing function by name (runtime, or a routing helper)
    patched = [
        module
        for name, module in list(sys.modules.items())
        if name.startswith("cpe_adapter") and getattr(module, "best_concepts", None) is original
    ]
    if variant.tau is None:
        with torch.no_grad():
            adapter.gate_v.mul_(variant.k)
    else:
        _BIAS.update(k=variant.k, tau=variant.tau, calls=0)
        for module in patched:
            module.best_concepts = _biased_best_concepts
    load_cpe_adapter(pipe, adapter, adapter_name="eraser")
    try:
        yield adapter
        if variant.tau is not None and not _BIAS["calls"]:
            raise RuntimeError("the runtime never called the patched routing function; the threshold was not applied")
    finally:
        unload_cpe_adapter(pipe, "eraser")
        for module in patched:
            module.best_concepts = original
        _BIAS.clear()


def effective_gates(logits: torch.Tensor, variant: Variant) -> torch.Tensor:
    """The gate values the variant produces from uncalibrated logits."""
    shift = 0.0 if variant.tau is None else variant.tau
    return torch.sigmoid(variant.k * (logits - shift))


# ------------------------------------------------------------------------------------- running
def trained(pipe: Any, concept: str, preset: str, cache: Path) -> CPEAdapter:
    folder = cache / f"{slug(concept)}-{preset}"
    if (folder / "cpe_adapter.safetensors").exists():
        return CPEAdapter.from_pretrained(folder)
    started = time.perf_counter()
    adapter = train_cpe(pipe, concept, preset=preset, seed=0, progress=False)
    print(f"trained {concept!r} ({preset}) in {time.perf_counter() - started:.0f} s", flush=True)
    adapter.save_pretrained(folder)
    return adapter


def per_phrase(records: list[dict[str, Any]], phrases: Sequence[str], held_out: Sequence[str]) -> dict[str, float]:
    """Mean paraphrase erase score of each phrase (records matched by their exact prompts)."""
    scores = {}
    for phrase in phrases:
        prompts = {template.format(phrase) for template in held_out}
        values = [r["value"] for r in records if r["kind"] == "paraphrase" and r["prompt"] in prompts]
        scores[phrase] = sum(values) / len(values) if values else float("nan")
    return scores


def evaluate_variant(
    pipe: Any,
    base: CPEAdapter,
    variant: Variant,
    concept: str,
    phrases: list[str],
    neighbours: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    held_out = templates(CASES_BY_CONCEPT[concept][0], held_out=True)
    started = time.perf_counter()
    with calibrated(pipe, base, variant):
        main = evaluate(
            pipe,
            [concept],
            neighbours,
            paraphrases={concept: phrases},
            images=False,
            attack=True,
            attack_budget=args.attack_budget,
            attack_prompts=args.attack_prompts,
            seed=0,
            progress=False,
        )
        other = evaluate(
            pipe, [concept], UNRELATED, templates=["{}"], attack=False, images=False, seed=0, progress=False
        )
    figures = main.figures
    erase, para = figures.get("erase_score"), figures.get("paraphrase_erase_score")
    return {
        "erase_score": erase,
        "paraphrase_erase_score": para,
        "ratio": para / erase if erase and para is not None else None,
        "per_paraphrase": per_phrase(main.records, phrases, held_out),
        "retain_drift_neighbours": figures.get("retain_drift"),
        "retain_drift_neighbours_max": max(main.per_concept[n]["retain_drift"] for n in neighbours),
        "retain_drift_unrelated": other.figures.get("retain_drift"),
        "attack_recovery": figures.get("attack_recovery"),
        "attack_best_prompt": figures.get("attack_best_prompt"),
        "embedding_attack_recovery": figures.get("embedding_attack_recovery"),
        "eval_seconds": round(time.perf_counter() - started, 1),
    }


CASES_BY_CONCEPT: dict[str, tuple[str, list[str]]] = {c: (p, ph) for c, p, ph in CASES}


def run_case(pipe: Any, concept: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    preset, phrases = CASES_BY_CONCEPT[concept]
    base = trained(pipe, concept, preset, Path(args.cache))
    neighbours = similar_concepts(pipe, concept, concept_pool(preset), NEIGHBOURS)
    anchors = anchor_prompts(pipe, concept, preset, args.anchor_templates)
    anchor_logits = gate_logits(base, encode(pipe, anchors))
    target_logits = gate_logits(base, encode(pipe, [t.format(concept) for t in templates(preset)])).amax(-1)
    held_out = templates(preset, held_out=True)
    phrase_logits = {p: gate_logits(base, encode(pipe, [t.format(p) for t in held_out])) for p in [concept, *phrases]}
    print(
        f"{concept}: anchor logits max {float(anchor_logits.max()):.3f} "
        f"q99.9 {float(torch.quantile(anchor_logits.flatten(), 0.999)):.3f}; training-prompt max-token logit "
        f"min {float(target_logits.min()):.3f} mean {float(target_logits.mean()):.3f}; held-out max-token logit "
        + ", ".join(f"{p!r} {float(v.amax(-1).mean()):.3f}" for p, v in phrase_logits.items()),
        flush=True,
    )
    cache_file = Path(args.out) / "evals" / f"{slug(concept)}.json"
    done: dict[str, Any] = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    rows = []
    for variant in variants(anchor_logits):
        if args.only and not any(word in variant.name for word in args.only):
            continue
        key = f"{variant.name}|{variant.k:.6g}|{variant.tau}|{args.attack_budget}|{args.attack_prompts}"
        if key not in done:
            done[key] = evaluate_variant(pipe, base, variant, concept, phrases, neighbours, args)
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(done, indent=1) + "\n")
        gates = {p: float(effective_gates(v, variant).amax(-1).mean()) for p, v in phrase_logits.items()}
        row = {
            "concept": concept,
            "preset": preset,
            "variant": variant.name,
            **asdict(variant),
            "anchor_max_gate": float(effective_gates(anchor_logits, variant).max()),
            "mean_max_token_gate": gates,
            "neighbours": neighbours,
            **done[key],
        }
        rows.append(row)
        print(
            f"{concept} | {variant.name}: erase {row['erase_score']:.4f} para {row['paraphrase_erase_score']:.4f} "
            f"drift {row['retain_drift_neighbours']:.4f}/{row['retain_drift_unrelated']:.4f} "
            f"attack {row['attack_recovery']:.3f} emb {row['embedding_attack_recovery']:.3f} "
            f"({row['eval_seconds']} s)",
            flush=True,
        )
    return rows


# ----------------------------------------------------------------------------------- reporting
def cell(name: str, value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{value:.{digits}f}"
    if name in FLOORS:
        op, bound = FLOORS[name]
        text += "" if (value >= bound if op == ">=" else value <= bound) else " ✗"
    return text


def paraphrase_lines(rows: list[dict[str, Any]], label: Callable[[dict[str, Any]], str]) -> list[str]:
    """One line per row: each paraphrase's erase score and (in brackets) its mean largest token gate."""
    lines = []
    for row in rows:
        parts = [
            f"{phrase} {score:.4f} ({row['mean_max_token_gate'][phrase]:.2f})"
            for phrase, score in row["per_paraphrase"].items()
        ]
        own = row["mean_max_token_gate"][row["concept"]]
        lines.append(f"- {label(row)}: trained name gate {own:.2f}; " + "; ".join(parts))
    return lines


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        "| concept | variant | k | tau | max anchor gate | erase | para erase | ratio | drift nb. (mean / max) "
        "| drift unrel. | attack rec. | emb. attack rec. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    baseline: dict[str, float] = {}
    for row in rows:
        if row["variant"] == "uncalibrated":
            baseline[row["concept"]] = row["erase_score"]
        erase = cell("erase_score", row["erase_score"])
        if row["erase_score"] < baseline.get(row["concept"], -math.inf) - 1e-6:
            erase += " ↓"
        tau = "—" if row["tau"] is None else f"{row['tau']:.3f}"
        lines.append(
            f"| {row['concept']} | {row['variant']} | {row['k']:.3g} | {tau} | {row['anchor_max_gate']:.2g} | {erase} "
            f"| {cell('', row['paraphrase_erase_score'])} | {cell('ratio', row['ratio'], 2)} "
            f"| {cell('retain_drift_neighbours', row['retain_drift_neighbours'])} / "
            f"{cell('retain_drift_neighbours', row['retain_drift_neighbours_max'])} "
            f"| {cell('retain_drift_unrelated', row['retain_drift_unrelated'])} "
            f"| {cell('attack_recovery', row['attack_recovery'], 3)} "
            f"| {cell('', row['embedding_attack_recovery'], 3)} |"
        )
    lines += [
        "",
        "✗ = misses: "
        + ", ".join(f"{k} {op} {v}" for k, (op, v) in FLOORS.items())
        + "; ↓ = erase below the baseline.",
        "",
        "Per paraphrase: paraphrase erase score (mean largest token gate over the held-out templates).",
        "",
    ]
    lines += paraphrase_lines(rows, lambda row: f"{row['concept']} / {row['variant']}")
    seen: dict[str, list[str]] = {r["concept"]: r["neighbours"] for r in rows}
    lines += ["", "Neighbours: " + "; ".join(f"{c}: {', '.join(n)}" for c, n in seen.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/calib")
    parser.add_argument("--cache", default="/tmp/calib/adapters", help="trained adapters (trained once if missing)")
    parser.add_argument("--concepts", nargs="*", default=[c for c, _, _ in CASES])
    parser.add_argument("--only", nargs="*", default=None, help="evaluate only variants whose name contains a word")
    parser.add_argument("--anchor-templates", type=int, default=5, help="training templates per anchor concept")
    parser.add_argument("--attack-budget", type=int, default=256)
    parser.add_argument("--attack-prompts", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = tiny_pipeline("sd-semantic")
    rows = [row for concept in args.concepts for row in run_case(pipe, concept, args)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    command = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gate_calibration.py --out " + args.out
    text = markdown(rows, command)
    (out / "results.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
