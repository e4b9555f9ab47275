"""Measured prototype of docs/design/mmdit.md option A: one ResAG on an SD3 transformer's ``context_embedder``.

A tiny random ``SD3Transformer2DModel`` reads the *real* semantic text embedding of
``tiny_pipeline("sd-semantic")`` (384-d MiniLM): ``joint_attention_dim = 384``, the pooled input is
the mean of the token embeddings. The ResAG sits on ``context_embedder`` (the Linear that maps the
prompt embedding into the joint text stream before the first block), whose input is the prompt
embedding itself, fixed over the denoising loop, so the text-only training of docs/training.md carries over
with one "layer" of weight ``c = 1``:

- training: the package's own machinery (``training.ConceptRun`` through ``train_one``, ``assemble``)
  on a :class:`~cpe_adapter.losses.ProjectionStack` built by hand for that single Linear;
- residual: the package's routing (``CPERuntime.residual``) with this one adapter;
- figures at the context-embedder output, with ``evaluation.erase_scores`` / ``retain_drifts``
  (column weights all 1): erase score of the target (and a paraphrase), drift of 5 neighbouring
  painters and of unrelated prompts;
- figures at the transformer output (noise prediction) for a few timesteps: relative change for the
  target and for the other prompts, and how far the target's output moved toward the output of the
  neutral prompt (``<out' - out, out_n - out> / ||out_n - out||^2``).

Also, with ``--unet-baseline``, the same concept trained the shipped way (UNet cross-attention K/V)
on the same pipeline and measured with ``cpe_adapter.evaluate``, for comparison.

    python benchmarks/mmdit_prototype.py [--steps 200] [--seed 0] [--unet-baseline] [--json out.json]

CPU, offline; about a minute with the default steps.
"""

from __future__ import annotations

import argparse
import json
import time
import types
from typing import Any

import torch
from diffusers import SD3Transformer2DModel

from cpe_adapter.config import TargetLayer
from cpe_adapter.evaluation import erase_scores, retain_drifts
from cpe_adapter.losses import ProjectionStack, _Group
from cpe_adapter.runtime import CPERuntime
from cpe_adapter.testing import tiny_pipeline
from cpe_adapter.training import TrainingContext, assemble, train_one
from cpe_adapter.training_data import encode_prompts
from cpe_adapter.training_plan import concept_specs, resolve_plan

TARGET = "Van Gogh"
PARAPHRASES = ["Vincent van Gogh"]
NEIGHBOURS = ["Claude Monet", "Paul Cezanne", "Pablo Picasso", "Rembrandt", "Salvador Dali"]
UNRELATED = [
    "a photo of a red car in the city",
    "a cat sleeping on a sofa",
    "a bowl of fruit on a wooden table",
    "a mountain lake at sunrise",
    "a portrait of an old fisherman",
]
# Held out from training's templates (pools.templates("styles")) where possible.
EVAL_TEMPLATES = ["a painting by {}", "{} style landscape", "a still life in the manner of {}", "art by {}"]
TIMESTEPS = [999, 500, 100]
# Training anchors: painters and everyday concepts, none of the evaluated neighbours (held out).
ANCHORS = [
    "Leonardo da Vinci",
    "Michelangelo",
    "Johannes Vermeer",
    "Edvard Munch",
    "Gustav Klimt",
    "Henri Matisse",
    "Frida Kahlo",
    "Andy Warhol",
    "Katsushika Hokusai",
    "J. M. W. Turner",
    "Georgia O'Keeffe",
    "Edgar Degas",
    "a dog",
    "a red car",
    "a house",
    "a tree",
    "a city street",
    "a bowl of soup",
    "a sailing boat",
    "a child",
]
# Faster schedule for the tiny model (as the package's training tests use); everything else: the preset.
OVERRIDES = {"first_stage_lr": 1e-2, "lr": 1e-3, "stages": 2, "anchor_weight": 10.0}
WIDTH = 64  # transformer width = caption_projection_dim (4 heads x 16)


def tiny_sd3(seed: int) -> SD3Transformer2DModel:
    """A 3-block random SD3 transformer whose text context is the 384-d MiniLM embedding."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=384,
        caption_projection_dim=WIDTH,
        pooled_projection_dim=384,
        pos_embed_max_size=16,
    ).eval()


def context_stack(linear: torch.nn.Linear) -> ProjectionStack:
    """``ProjectionStack`` for the single layer ``linear`` with layer weight 1 (as ``build_stack`` builds it)."""
    weight = linear.weight.detach().float()
    width = weight.shape[0]
    column_weight = torch.full((width,), 1.0 / width)
    gram = weight.T @ (column_weight.unsqueeze(1) * weight)
    gram = 0.5 * (gram + gram.T)
    values, vectors = torch.linalg.eigh(gram.double())
    group = _Group(torch.tensor([0]), torch.arange(width), weight.T.unsqueeze(0).contiguous())
    return ProjectionStack(
        weight,
        torch.ones(1),
        column_weight,
        gram,
        values.clamp_min(0).float(),
        vectors.float(),
        [group],
        torch.tensor([0]),
        1,
    )


def residual_fn(adapter: Any, layer: TargetLayer):
    """``E -> R(E)`` with the package's routing (``CPERuntime.residual``) for this one adapter."""
    shim = types.SimpleNamespace(
        participants=lambda: [("prototype", adapter, 1.0)], _follow=lambda *_: None, layers=[layer]
    )

    def residual(embeds: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return CPERuntime.residual(shim, embeds, adapter.gate_v)

    return residual


def transformer_outputs(
    model: SD3Transformer2DModel, embeds: torch.Tensor, residual: Any | None, seed: int
) -> dict[int, torch.Tensor]:
    """Noise predictions for ``embeds`` ``[B, T, 384]`` at TIMESTEPS (same latents), with or without ``R``."""
    pooled = embeds.mean(dim=1)
    latents = torch.randn(embeds.shape[0], 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    hook = None
    if residual is not None:
        hook = model.context_embedder.register_forward_hook(lambda _m, args, out: out + residual(args[0]))
    try:
        with torch.no_grad():
            return {
                t: model(
                    hidden_states=latents,
                    encoder_hidden_states=embeds,
                    pooled_projections=pooled,
                    timestep=torch.full((embeds.shape[0],), t),
                ).sample
                for t in TIMESTEPS
            }
    finally:
        if hook is not None:
            hook.remove()


def relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||a - b|| / ||b||``."""
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)


def toward(moved: torch.Tensor, original: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """Per-sample ``<moved - original, goal - original> / ||goal - original||^2``."""
    dims = tuple(range(1, moved.dim()))
    gap = goal - original
    return ((moved - original) * gap).sum(dims) / (gap * gap).sum(dims)


def mean(values: torch.Tensor) -> float:
    return round(float(values.float().mean()), 4)


def unet_baseline(pipe: Any, steps: int | None, seed: int) -> dict[str, Any]:
    """The same concept erased the shipped way (UNet K/V), measured with ``cpe_adapter.evaluate``."""
    import cpe_adapter

    adapter = cpe_adapter.train_cpe(
        pipe, TARGET, preset="styles", seed=seed, steps=steps, anchors=ANCHORS, progress=False, **OVERRIDES
    )
    pipe.load_cpe_adapter(adapter, "baseline")
    try:
        report = cpe_adapter.evaluate(
            pipe,
            erased=[TARGET],
            retained=NEIGHBOURS,
            paraphrases={TARGET: PARAPHRASES},
            templates=EVAL_TEMPLATES,
            attack=False,
            images=False,
        )
    finally:
        pipe.unload_cpe_adapter("baseline")
    data = report.to_dict()
    return {k: data.get(k) for k in ("erase_score", "paraphrase_erase_score", "retain_drift")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="total erase iterations (train_cpe's `steps`)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unet-baseline", action="store_true", help="also train and evaluate the UNet K/V eraser")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(2)

    pipe = tiny_pipeline("sd-semantic")
    model = tiny_sd3(args.seed)
    linear = model.context_embedder
    layer = TargetLayer("context_embedder", linear.in_features, linear.out_features)

    plan, _ = resolve_plan("styles", args.steps, ANCHORS, dict(OVERRIDES))
    spec = concept_specs(pipe, TARGET, plan)[0]
    context = TrainingContext(
        pipe, plan, [layer], context_stack(linear), torch.device("cpu"), "styles", "tiny-sd3-prototype", None
    )
    start = time.perf_counter()
    result = train_one(context, spec, 0, args.seed, progress=False)
    adapter = assemble(context, [result], args.seed, args.steps, "mmdit-prototype").eval()
    train_seconds = time.perf_counter() - start
    residual = residual_fn(adapter, layer)

    def project(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embeds = encode_prompts(pipe, prompts).float()
        with torch.no_grad():
            base = linear(embeds)
        return embeds, base, base + residual(embeds)

    ones = torch.ones(WIDTH)
    figures: dict[str, Any] = {
        "steps": args.steps,
        "seed": args.seed,
        "overrides": OVERRIDES,
        "train_seconds": round(train_seconds, 1),
        "final_loss": {k: round(float(v), 5) for k, v in result.final_loss.items()},
    }
    fill = [t.format(TARGET) for t in EVAL_TEMPLATES]
    neutral_prompts = [t.format(spec.neutral) for t in EVAL_TEMPLATES]
    target_e, target_p, target_q = project(fill)
    neutral_e, neutral_p, _ = project(neutral_prompts)
    figures["context_embedder"] = {
        "erase_score": mean(erase_scores(target_p, target_q, neutral_p, spec.eta, ones)),
        "paraphrase_erase_score": mean(
            erase_scores(
                *project([t.format(p) for t in EVAL_TEMPLATES for p in PARAPHRASES])[1:],
                neutral_p.repeat_interleave(len(PARAPHRASES), 0),
                spec.eta,
                ones,
            )
        ),
        "target_drift": mean(retain_drifts(target_p, target_q, ones)),
        "neighbour_drift": {
            name: mean(retain_drifts(*project([t.format(name) for t in EVAL_TEMPLATES])[1:], ones))
            for name in NEIGHBOURS
        },
        "unrelated_drift": mean(retain_drifts(*project(UNRELATED)[1:], ones)),
    }
    neighbour_e = encode_prompts(pipe, [t.format(n) for n in NEIGHBOURS for t in EVAL_TEMPLATES[:1]]).float()
    unrelated_e = encode_prompts(pipe, UNRELATED).float()
    outputs: dict[str, Any] = {}
    groups = {"target": target_e, "neighbours": neighbour_e, "unrelated": unrelated_e}
    neutral_out = transformer_outputs(model, neutral_e, None, args.seed)
    for group, embeds in groups.items():
        before = transformer_outputs(model, embeds, None, args.seed)
        after = transformer_outputs(model, embeds, residual, args.seed)
        outputs[group] = {str(t): {"relative_change": mean(relative(after[t], before[t]))} for t in TIMESTEPS}
        if group == "target":
            for t in TIMESTEPS:
                outputs[group][str(t)]["toward_neutral"] = mean(toward(after[t], before[t], neutral_out[t]))
                outputs[group][str(t)]["neutral_distance"] = mean(relative(neutral_out[t], before[t]))
    figures["transformer_output"] = outputs
    if args.unet_baseline:
        figures["unet_baseline"] = unet_baseline(pipe, args.steps, args.seed)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
