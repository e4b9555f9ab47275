"""Per-token gate (no token mixing): does an eraser *trained* with ``S = I`` widen erasure to paraphrases?

The method's gate mixes tokens first (docs/concepts.md): ``Ē = S E`` with ``S = softmax((E A)(E B)^T)``,
``g = sigmoid(Ē v)`` and residual ``(g ⊙ Ē) D U``. The per-token option drops the mixing: ``S = I``,
so ``Ē = E``, ``g_t = sigmoid(E_t · v)`` and the residual is ``(g ⊙ E) D U``; ``A`` and ``B`` are unused.
The library has no such option, so this script monkeypatches the two functions every path goes
through, at module level, for the whole run (restored at the end):

- training: ``codes_from_projection`` of :mod:`cpe_adapter.losses` and the same name imported by
  :mod:`cpe_adapter.training` (called by the erase losses, the attack phase, the attack objective
  of the prompt searches, ``evaluate`` and ``gate_codes``) returns
  ``scale * g ⊙ (E D)`` with ``g = sigmoid(E v)`` (identity mixing: ``mixed = rest``);
- inference: ``cpe_adapter.routing.best_concepts`` (the name :func:`cpe_adapter.routing.route_row`
  looks up) returns ``gate = max_c sigmoid(E v_c)`` per token, ``index = argmax`` (first on ties)
  and ``mixed = E``.

Checks (the run stops if one fails): both patched functions are called (counters) during training,
the sanity checks and every evaluation; an untrained adapter gives exactly zero residual; and the
inference residual of each trained adapter equals the one the training code computes for it.

"Van Gogh" (styles) and "Tom Hanks" (names) are trained with the full default presets and seed 0 on
``tiny_pipeline("sd-semantic")`` (cached in ``--cache`` with their training time) and evaluated exactly
as ``benchmarks/gate_calibration.py`` evaluates (its paraphrases, neighbours, unrelated prompts,
evaluation function and attack settings): erase score, held-out paraphrase erase score (overall and
per paraphrase) and its ratio to the erase score, retain drift on the 5 most similar pool concepts
(mean and max) and on 5 unrelated prompts, prompt-attack and embedding-attack recovery. The table also
holds the token-mixing rows of that script (``--baseline``, same setup) and, for the per-token
adapters, a "ceiling: every gate open" row (``g = 1`` for every token, residual ``E D U``).

Writes ``results.json`` and ``results.md`` into ``--out`` and prints the table::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/per_token_gate.py --out /tmp/pertoken
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gate_calibration as calib
import torch

import cpe_adapter.losses as cpe_losses
import cpe_adapter.routing as cpe_routing
import cpe_adapter.training as cpe_training
from cpe_adapter import CPEAdapter
from cpe_adapter.evaluation import KVProbe
from cpe_adapter.gate import expand_residual
from cpe_adapter.loaders import load_cpe_adapter, unload_cpe_adapter
from cpe_adapter.pools import concept_pool, templates
from cpe_adapter.runtime import get_runtime
from cpe_adapter.targets import denoiser_of
from cpe_adapter.testing import tiny_pipeline
from cpe_adapter.training import train_cpe
from cpe_adapter.training_data import similar_concepts

PER_TOKEN = calib.Variant("per-token gate (S = I)", 1.0, None, "trained with identity mixing")
CEILING = calib.Variant("per-token ceiling: every gate open (g = 1)", 1.0, None, "diagnostic upper bound")
BASELINE_VARIANTS = ("uncalibrated", "ceiling: every gate open (g = 1)")
CALLS: dict[str, int] = {"training": 0, "routing": 0}
_OPEN: dict[str, bool] = {"every_gate": False}  # the ceiling: every per-token gate forced to 1


# ------------------------------------------------------------------------------------ the patches
def per_token_codes(
    proj: torch.Tensor, rank: int, tied: bool, scale: float, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cpe_adapter.losses.codes_from_projection` with ``S = I``: ``h = scale * g ⊙ (E D)``.

    ``g = sigmoid(E v)``; ``proj = E [A | B | v | D | 0]`` (``B`` left out when tied); ``A``, ``B`` are not read.
    """
    CALLS["training"] += 1
    rest = proj[..., rank if tied else 2 * rank :]
    gates = torch.sigmoid(rest[..., 0])
    return scale * gates.unsqueeze(-1) * rest[..., 1 : 1 + width], gates


def per_token_best_concepts(
    embeds: torch.Tensor,
    gate_a: torch.Tensor,
    gate_b: torch.Tensor | None,
    gate_v: torch.Tensor,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`cpe_adapter.gate.best_concepts` with ``S = I``: ``(max_c sigmoid(E v_c), argmax_c, E)`` per token."""
    CALLS["routing"] += 1
    gates = torch.sigmoid(torch.einsum("btd,nd->btn", embeds, gate_v))  # [B, T, N]
    index = gates.argmax(dim=-1)  # the first maximum on ties
    gate = gates.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    if _OPEN["every_gate"]:
        gate = torch.ones_like(gate)
    return gate, index, embeds.clone()


def patched() -> tuple[Any, Any, Any]:
    """The three names the patch replaces, as they are now."""
    return cpe_losses.codes_from_projection, cpe_training.codes_from_projection, cpe_routing.best_concepts


@contextlib.contextmanager
def per_token_gate() -> Iterator[None]:
    """Both patches installed where the library looks the names up; the originals put back after."""
    saved = patched()
    cpe_losses.codes_from_projection = cpe_training.codes_from_projection = per_token_codes
    cpe_routing.best_concepts = per_token_best_concepts
    try:
        yield
    finally:
        cpe_losses.codes_from_projection, cpe_training.codes_from_projection, cpe_routing.best_concepts = saved
        _OPEN["every_gate"] = False


@contextlib.contextmanager
def counted(counter: str, what: str) -> Iterator[None]:
    """Fail unless the patched function ``counter`` was called inside the block."""
    before = CALLS[counter]
    yield
    if CALLS[counter] == before:
        raise RuntimeError(f"{what}: the patched {counter} function was never called; the per-token gate was not used")


# ------------------------------------------------------------------------------------ the checks
def runtime_residual(pipe: Any, embeds: torch.Tensor) -> torch.Tensor:
    """The loaded adapters' routed residual ``[B, T, sum(d_out)]`` (target-layer order), as inference computes it."""
    denoiser = denoiser_of(pipe)
    with torch.no_grad():
        return get_runtime(denoiser).residual(embeds, next(denoiser.parameters()))


def check_untrained_is_zero(pipe: Any, config: Any, prompts: list[str]) -> float:
    """Largest ``|P'(E) - P(E)|`` of a freshly initialised adapter (``U = 0``) under the patch; must be exactly 0."""
    load_cpe_adapter(pipe, CPEAdapter(config), adapter_name="untrained")
    try:
        probe = KVProbe(pipe)
        embeds = probe.encode(prompts)
        with torch.no_grad(), counted("routing", "untrained adapter"):
            erased = probe.project(embeds, original=False)
        change = float((erased - probe.project(embeds, original=True)).abs().max())
    finally:
        unload_cpe_adapter(pipe, "untrained")
    if change != 0.0:
        raise RuntimeError(f"an untrained adapter changes the projections by {change:g} under the per-token patch")
    return change


def check_training_matches_inference(pipe: Any, adapter: CPEAdapter, prompts: list[str]) -> float:
    """Largest relative difference between the inference residual and the training code's ``h U`` for ``adapter``."""
    embeds = calib.encode(pipe, prompts)
    key = None if adapter.config.tie_gate_qk else adapter.gate_b[0]
    with torch.no_grad(), counted("training", "training-side residual"):
        codes, _ = cpe_losses.gate_codes(
            embeds, adapter.gate_a[0], key, adapter.gate_v[0], adapter.down[0], adapter.residual_scale
        )
    layers = len(adapter.config.target_layers)
    with torch.no_grad():
        expected = expand_residual(
            codes.unflatten(-1, (layers, adapter.config.residual_rank)), adapter.up[0], adapter.layer_of_column
        )
    load_cpe_adapter(pipe, adapter, adapter_name="check")
    try:
        with counted("routing", "inference residual"):
            found = runtime_residual(pipe, embeds)
    finally:
        unload_cpe_adapter(pipe, "check")
    gap = float((found - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    if not gap < 1e-4:
        raise RuntimeError(f"the per-token inference residual differs from the training one (relative {gap:.3g})")
    return gap


# ------------------------------------------------------------------------------------- running
def trained(pipe: Any, concept: str, preset: str, cache: Path) -> tuple[CPEAdapter, float]:
    """The per-token eraser of ``concept`` (trained under the patch, seed 0) and its training seconds."""
    folder = cache / f"{calib.slug(concept)}-{preset}"
    timing = folder / "train_seconds.json"
    if (folder / "cpe_adapter.safetensors").exists() and timing.exists():
        return CPEAdapter.from_pretrained(folder), float(json.loads(timing.read_text())["seconds"])
    started = time.perf_counter()
    with counted("training", f"training {concept!r}"):
        adapter = train_cpe(pipe, concept, preset=preset, seed=0, progress=False)
    seconds = round(time.perf_counter() - started, 1)
    adapter.save_pretrained(folder)
    timing.write_text(json.dumps({"seconds": seconds, "codes_calls": CALLS["training"]}) + "\n")
    print(f"trained {concept!r} ({preset}) per-token in {seconds:.0f} s", flush=True)
    return adapter, seconds


def token_gates(adapter: CPEAdapter, embeds: torch.Tensor) -> torch.Tensor:
    """Per-token gates ``sigmoid(E v)`` of concept 0: ``[B, T, d] -> [B, T]``."""
    with torch.no_grad():
        return torch.sigmoid(embeds @ adapter.gate_v[0])


def run_case(pipe: Any, concept: str, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    preset, phrases = calib.CASES_BY_CONCEPT[concept]
    adapter, seconds = trained(pipe, concept, preset, Path(args.cache))
    held_out = templates(preset, held_out=True)
    checks = {
        "untrained_max_abs_change": check_untrained_is_zero(
            pipe, adapter.config, [t.format(concept) for t in held_out]
        ),
        "inference_vs_training_rel_gap": check_training_matches_inference(
            pipe, adapter, [t.format(p) for p in [concept, *phrases] for t in held_out[:2]] + [""]
        ),
    }
    neighbours = similar_concepts(pipe, concept, concept_pool(preset), calib.NEIGHBOURS)
    anchor_gates = token_gates(
        adapter, calib.encode(pipe, calib.anchor_prompts(pipe, concept, preset, args.anchor_templates))
    )
    phrase_gates = {
        p: float(token_gates(adapter, calib.encode(pipe, [t.format(p) for t in held_out])).amax(-1).mean())
        for p in [concept, *phrases]
    }
    cache_file = Path(args.out) / "evals" / f"{calib.slug(concept)}.json"
    done: dict[str, Any] = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    rows = []
    for variant in [PER_TOKEN] + ([CEILING] if args.ceiling else []):
        key = f"{variant.name}|{args.attack_budget}|{args.attack_prompts}"
        if key not in done:
            _OPEN["every_gate"] = variant is CEILING
            try:
                with counted("routing", f"evaluating {variant.name!r}"):
                    done[key] = calib.evaluate_variant(pipe, adapter, variant, concept, phrases, neighbours, args)
            finally:
                _OPEN["every_gate"] = False
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(done, indent=1) + "\n")
        opened = variant is CEILING
        row = {
            "concept": concept,
            "preset": preset,
            "gate": "per-token",
            "variant": variant.name,
            "anchor_max_gate": 1.0 if opened else float(anchor_gates.max()),
            "mean_max_token_gate": {p: 1.0 if opened else g for p, g in phrase_gates.items()},
            "neighbours": neighbours,
            "train_seconds": seconds,
            **done[key],
        }
        rows.append(row)
        print(
            f"{concept} | {variant.name}: erase {row['erase_score']:.4f} para {row['paraphrase_erase_score']:.4f} "
            f"drift {row['retain_drift_neighbours']:.4f}/{row['retain_drift_unrelated']:.4f} "
            f"attack {row['attack_recovery']:.3f} emb {row['embedding_attack_recovery']:.3f} ({row['eval_seconds']} s)",
            flush=True,
        )
    return rows, checks


def baseline_rows(path: Path, concepts: list[str]) -> list[dict[str, Any]]:
    """The token-mixing rows of ``gate_calibration.py`` (its ``results.json``), with training seconds from its log."""
    if not path.exists():
        print(f"no baseline at {path}; the mixing rows are left out", flush=True)
        return []
    log = path.parent / "train.log"
    seconds = dict(re.findall(r"^(.+?) (\d+) s$", log.read_text(), re.M)) if log.exists() else {}
    rows = []
    for row in json.loads(path.read_text()):
        if row["concept"] in concepts and row["variant"] in BASELINE_VARIANTS:
            found = seconds.get(row["concept"])
            rows.append({**row, "gate": "mixing", "train_seconds": float(found) if found else None})
    return rows


# ----------------------------------------------------------------------------------- reporting
def markdown(rows: list[dict[str, Any]], checks: dict[str, Any], command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        "| concept | gate | variant | max anchor gate | erase | para erase | ratio | drift nb. (mean / max) "
        "| drift unrel. | attack rec. | emb. attack rec. | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        train = "n/a" if row.get("train_seconds") is None else f"{row['train_seconds']:.0f}"
        lines.append(
            f"| {row['concept']} | {row['gate']} | {row['variant']} | {row['anchor_max_gate']:.2g} "
            f"| {calib.cell('', row['erase_score'])} | {calib.cell('', row['paraphrase_erase_score'])} "
            f"| {calib.cell('ratio', row['ratio'], 2)} "
            f"| {calib.cell('retain_drift_neighbours', row['retain_drift_neighbours'])} / "
            f"{calib.cell('retain_drift_neighbours', row['retain_drift_neighbours_max'])} "
            f"| {calib.cell('retain_drift_unrelated', row['retain_drift_unrelated'])} "
            f"| {calib.cell('attack_recovery', row['attack_recovery'], 3)} "
            f"| {calib.cell('', row['embedding_attack_recovery'], 3)} | {train} |"
        )
    lines += [
        "",
        "✗ = misses: " + ", ".join(f"{k} {op} {v}" for k, (op, v) in calib.FLOORS.items()) + ".",
        "mixing rows: the uncalibrated token-mixing erasers of benchmarks/gate_calibration.py (same setup).",
        "",
        "Per paraphrase: paraphrase erase score (mean largest token gate over the held-out templates).",
        "",
    ]
    lines += calib.paraphrase_lines(rows, lambda row: f"{row['concept']} / {row['gate']} / {row['variant']}")
    seen = {r["concept"]: r["neighbours"] for r in rows}
    lines += ["", "Neighbours: " + "; ".join(f"{c}: {', '.join(n)}" for c, n in seen.items())]
    lines += ["", "Checks: " + json.dumps(checks)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/pertoken")
    parser.add_argument("--cache", default="/tmp/pertoken/adapters", help="per-token adapters (trained if missing)")
    parser.add_argument("--baseline", default="/tmp/calib/results.json", help="gate_calibration.py results")
    parser.add_argument("--concepts", nargs="*", default=[c for c, _, _ in calib.CASES])
    parser.add_argument("--no-ceiling", dest="ceiling", action="store_false", help="skip the every-gate-open row")
    parser.add_argument("--anchor-templates", type=int, default=5, help="training templates per anchor concept")
    parser.add_argument("--attack-budget", type=int, default=256)
    parser.add_argument("--attack-prompts", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = tiny_pipeline("sd-semantic")
    rows, checks = [], {}
    originals = patched()
    with per_token_gate():
        for concept in args.concepts:
            found, checks[concept] = run_case(pipe, concept, args)
            rows += found
    if patched() != originals:
        raise RuntimeError("the patches were not restored")
    checks["patched_calls"] = dict(CALLS)
    base = baseline_rows(Path(args.baseline), args.concepts)
    ordered = [
        r
        for c in args.concepts
        for r in [*(b for b in base if b["concept"] == c), *(p for p in rows if p["concept"] == c)]
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"rows": ordered, "checks": checks}, indent=2) + "\n", encoding="utf-8"
    )
    command = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/per_token_gate.py --out " + args.out
    text = markdown(ordered, checks, command)
    (out / "results.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
