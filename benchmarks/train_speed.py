"""Training speed: cpe-adapter's batched trainer against a naive one, measured in the same run.

For each model it reports the one-off prompt encoding cost, milliseconds per erase step (stage with
an adversary, the most expensive kind) and per attack step, the same for a *naive* trainer (each
step encodes its prompts with the text encoder again and loops over the layers in Python, with
full projections and the mixed embedding formed explicitly; also the same naive loop reading cached
embeddings), their ratios, and the estimated time
of one concept with the full "styles" preset. Models:

- ``tiny-sd`` and ``sd-semantic``: the offline test pipelines (`cpe_adapter.testing`);
- ``sd15``: a full-size SD 1.5 architecture with random weights built from config values (UNet
  320/640/1280/1280, 16 cross-attention layers of dim 768; CLIP ViT-L/14 text encoder), with a
  tiny VAE and the tiny offline tokenizer (the VAE is never used in training).

Times are wall-clock and process CPU time (the latter is less affected by other jobs on a shared
machine). Usage::

    python benchmarks/train_speed.py --quick
    python benchmarks/train_speed.py --models sd-semantic --steps 200 --device cpu --threads 1
    python benchmarks/train_speed.py --models sd-semantic --end-to-end   # the whole styles preset
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from cpe_adapter.config import ConceptSpec
from cpe_adapter.losses import build_stack
from cpe_adapter.presets import get_preset
from cpe_adapter.targets import cross_attention_modules, find_target_layers
from cpe_adapter.training import ConceptRun
from cpe_adapter.training_data import build_prompt_set
from cpe_adapter.training_plan import resolve_plan


def build(name: str) -> Any:
    from cpe_adapter.testing import tiny_pipeline

    if name == "tiny-sd":
        return tiny_pipeline("sd")
    if name == "sd-semantic":
        return tiny_pipeline("sd-semantic")
    if name == "sd15":
        from cpe_adapter.testing import sd15_random_pipeline

        return sd15_random_pipeline(full_vae=False)
    raise SystemExit(f"unknown model {name!r}")


class Clock:
    """Wall and process CPU time of a block; ``.used`` is CPU time on the CPU, wall time (after a
    synchronisation) on an accelerator, whose work the process CPU time does not see."""

    accelerator = False

    def __enter__(self) -> Clock:
        self._sync()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._sync()
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    @property
    def used(self) -> float:
        return self.wall if self.accelerator else self.cpu

    def _sync(self) -> None:
        if self.accelerator and torch.cuda.is_available():
            torch.cuda.synchronize()


# ---------------------------------------------------------------------------- the naive trainer
class NaiveTrainer:
    """The same erase-stage losses, computed the obvious way: per-step text encoding, a Python loop over
    layers, full projections ``P(E)`` and ``P'(E)``, the mixed embedding ``S E`` formed explicitly."""

    def __init__(
        self, pipe: Any, run: ConceptRun, templates: list[str], anchor_words: list[str], device: Any, cached: bool
    ) -> None:
        self.pipe, self.run, self.device, self.cached = pipe, run, device, cached
        self.templates, self.anchor_words = templates, anchor_words
        self.attns = [a for _, a in cross_attention_modules(pipe.unet)]
        self.weights = run.stack.layer_weight.tolist()
        self.generator = torch.Generator().manual_seed(0)
        layers = run.stack.num_layers
        self.r = run.plan.preset.residual_rank
        sizes = [t.out_features for t in find_target_layers(pipe.unet)]
        self.ups = [p.clone().requires_grad_(True) for p in torch.split(run.params["up"], sizes, dim=1)]
        self.downs = [p.clone().requires_grad_(True) for p in torch.split(run.params["down"], self.r, dim=1)]
        self.gate = {k: run.params[k].clone().requires_grad_(True) for k in ("gate_a", "gate_b", "gate_v")}
        params = [*self.ups, *self.downs, *self.gate.values()]
        self.optimizer = torch.optim.AdamW(params, lr=3e-5, weight_decay=0.01)
        assert len(self.downs) == layers

    def encode(self, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.pipe.encode_prompt(
                prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )[0].float()

    def step(self) -> None:
        run, preset = self.run, self.run.plan.preset
        j = int(torch.randint(len(self.templates), (1,), generator=self.generator))
        template = self.templates[j]
        words = [self.anchor_words[int(i)] for i in torch.randint(len(self.anchor_words), (2 * preset.anchor_samples,))]
        if self.cached:
            picks = torch.randint(run.anchors.shape[0], (2 * preset.anchor_samples,), generator=self.generator)
            e_t, e_n, empty = run.target[j], run.neutral[j], run.empty
            pool = run.anchors[picks.to(run.anchors.device)].to(self.device, torch.float32)
        else:
            prompts = [template.format(run.spec.name), template.format(run.spec.neutral), ""]
            prompts += [self.templates[int(i) % len(self.templates)].format(w) for i, w in enumerate(words)]
            embeds = self.encode(prompts)
            e_t, e_n, empty, pool = embeds[0], embeds[1], embeds[2], embeds[3:]
        lam = torch.rand(preset.anchor_samples, 1, 1, generator=self.generator).to(self.device)
        mix = lam * pool[::2] + (1 - lam) * pool[1::2]
        noise = torch.randn(mix.shape, generator=self.generator).to(self.device)
        mix = mix + noise * 1e-3 * mix.norm(dim=-1, keepdim=True) / math.sqrt(mix.shape[-1])
        adv = e_t + run.delta
        x = torch.cat([e_t[None], adv, empty[None], mix])
        gate = self.gate
        mixing = torch.softmax((x @ gate["gate_a"]) @ (x @ gate["gate_b"]).transpose(-1, -2), dim=-1)
        mixed = mixing @ x  # [n, T, d], formed explicitly
        g = torch.sigmoid(mixed @ gate["gate_v"])
        hidden = g.unsqueeze(-1) * mixed
        total = torch.zeros((), device=self.device)
        labelled = 1 + adv.shape[0]
        for index, attn in enumerate(self.attns):
            for k, proj in enumerate((attn.to_k, attn.to_v)):
                layer = 2 * index + k
                weight, bias = proj.weight.detach(), None if proj.bias is None else proj.bias.detach()
                base = F.linear(x, weight, bias)
                residual = run.scale * (hidden @ self.downs[layer]) @ self.ups[layer]
                out = base + residual
                p_n = F.linear(e_n, weight, bias)
                goal = (1 + run.spec.eta) * p_n - run.spec.eta * base[0]
                erase = (out[0] - goal).pow(2).mean()
                adv_loss = (out[1:labelled] - goal).pow(2).mean()
                anchor = (out[labelled:] - base[labelled:]).pow(2).mean()
                total = total + self.weights[layer] * (erase + adv_loss + preset.anchor_weight * anchor)
        self.optimizer.zero_grad()
        (total / len(self.weights)).backward()
        self.optimizer.step()


# --------------------------------------------------------------------------------- measuring
def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    pipe = build(name)
    device = torch.device(args.device)
    Clock.accelerator = device.type != "cpu"
    pipe.to(device)
    from cpe_adapter import pools

    templates = pools.templates("styles")[: args.templates]
    words = pools.general_words("styles")[: args.anchors]
    with Clock() as enc:
        data = build_prompt_set(pipe, "Van Gogh", "real photograph", "styles", templates=templates, anchors=words)
    prompts = 2 * len(templates) + len(data.anchor_prompts) + 1
    plan, _ = resolve_plan("styles", None, None, {})
    plan = dataclasses.replace(plan, erase_iters=(args.steps, args.steps), attack_iters=args.steps)
    stack = build_stack(pipe.unet, find_target_layers(pipe.unet), data.target.shape[1], device)
    run = ConceptRun(stack, data, ConceptSpec("Van Gogh", "real photograph", 0.5), plan, 0, device)

    def quiet(*_: Any) -> None:
        return None

    with Clock() as first:
        run.erase_phase(0, quiet)
    with Clock() as attack:
        run.attack_phase(0, quiet)
    with Clock() as erase:
        run.erase_phase(1, quiet)
    naive = NaiveTrainer(pipe, run, templates, words, device, cached=False)
    naive.step()
    with Clock() as slow:
        for _ in range(args.naive_steps):
            naive.step()
    looped = NaiveTrainer(pipe, run, templates, words, device, cached=True)
    looped.step()
    with Clock() as loop_only:
        for _ in range(args.naive_steps):
            looped.step()
    n, m = args.steps, args.naive_steps
    styles = get_preset("styles")
    per_anchor = min(styles.anchor_templates or len(pools.templates("styles")), len(pools.templates("styles")))
    default_prompts = 2 * len(pools.templates("styles")) + (len(pools.general_words("styles")) + 50) * per_anchor
    per = {
        "encode_ms_per_prompt": 1e3 * enc.used / prompts,
        "erase0_ms": 1e3 * first.used / n,
        "erase_ms": 1e3 * erase.used / n,
        "attack_ms": 1e3 * attack.used / n,
        "naive_erase_ms": 1e3 * slow.used / m,
        "naive_cached_erase_ms": 1e3 * loop_only.used / m,
        "erase_wall_ms": 1e3 * erase.wall / n,
        "naive_wall_ms": 1e3 * slow.wall / m,
    }
    loop_s = (
        styles.first_stage_iters * per["erase0_ms"]
        + (styles.stages - 1) * styles.erase_iters * (per["erase_ms"] + per["attack_ms"])
    ) / 1e3
    naive_s = (
        styles.total_erase_iters * per["naive_erase_ms"] + (styles.stages - 1) * styles.attack_iters * per["attack_ms"]
    ) / 1e3
    encode_s = default_prompts * per["encode_ms_per_prompt"] / 1e3
    return {
        "model": name,
        "d": stack.dim,
        "layers": stack.num_layers,
        "sum_d_out": int(stack.weight.shape[0]),
        "threads": torch.get_num_threads(),
        "clock": "wall" if Clock.accelerator else "CPU",
        **{k: round(v, 3) for k, v in per.items()},
        "erase_steps_per_s": round(1e3 / per["erase_ms"], 1),
        "attack_steps_per_s": round(1e3 / per["attack_ms"], 1),
        "speedup_erase_step": round(per["naive_erase_ms"] / per["erase_ms"], 1),
        "speedup_vs_cached_naive": round(per["naive_cached_erase_ms"] / per["erase_ms"], 1),
        "styles_loop_s": round(loop_s, 1),
        "styles_encode_s": round(encode_s, 1),
        "styles_concept_s": round(loop_s + encode_s, 1),
        "naive_styles_concept_s": round(naive_s, 1),
    }


def end_to_end(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One real ``train_cpe`` call with the full ``styles`` preset, split into encoding and loops."""
    import cpe_adapter.training as training
    from cpe_adapter.training import train_cpe

    pipe = build(name)
    spent: dict[str, float] = {"encode": 0.0, "erase": 0.0, "attack": 0.0}
    originals = {}

    def timed(owner: Any, attr: str, key: str) -> None:
        original = getattr(owner, attr)
        originals[(owner, attr)] = original

        def wrapper(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spent[key] += time.perf_counter() - start

        setattr(owner, attr, wrapper)

    timed(training, "build_prompt_set", "encode")
    timed(training.ConceptRun, "erase_phase", "erase")
    timed(training.ConceptRun, "attack_phase", "attack")
    try:
        with Clock() as whole:
            train_cpe(pipe, "Van Gogh", preset="styles", device=args.device, progress=False)
    finally:
        for (owner, attr), original in originals.items():
            setattr(owner, attr, original)
    return {
        "model": name,
        "wall_s": round(whole.wall, 1),
        "cpu_s": round(whole.cpu, 1),
        **{f"{k}_wall_s": round(v, 1) for k, v in spent.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-sd", "sd-semantic", "sd15"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="few steps (a smoke run)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps of each kind")
    parser.add_argument("--naive-steps", type=int, default=10)
    parser.add_argument("--templates", type=int, default=43, help="templates encoded for the timing")
    parser.add_argument("--anchors", type=int, default=8, help="anchor concepts encoded for the timing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--end-to-end",
        action="store_true",
        help="time one real train_cpe call with the full styles preset (default threads) instead",
    )
    args = parser.parse_args()
    if args.end_to_end:
        for name in args.models:
            row = end_to_end(name, args)
            print(json.dumps(row) if args.json else " | ".join(f"{k} {v}" for k, v in row.items()))
        return
    if args.quick:
        args.steps, args.naive_steps, args.templates, args.anchors = 20, 3, 8, 4
    torch.set_num_threads(args.threads)
    rows = [measure(name, args) for name in args.models]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    for row in rows:
        print(
            f"{row['model']:>11}: d={row['d']} layers={row['layers']} sum(d_out)={row['sum_d_out']} "
            f"threads={row['threads']} | encode {row['encode_ms_per_prompt']:.1f} ms/prompt | "
            f"erase {row['erase_ms']:.2f} ms/step ({row['erase_steps_per_s']}/s), stage-0 {row['erase0_ms']:.2f}, "
            f"attack {row['attack_ms']:.2f} ms/step ({row['attack_steps_per_s']}/s) | naive erase "
            f"{row['naive_erase_ms']:.1f} ms/step -> x{row['speedup_erase_step']} (naive with cached embeddings "
            f"{row['naive_cached_erase_ms']:.1f} ms/step -> x{row['speedup_vs_cached_naive']}) | "
            "styles preset per concept: "
            f"loop {row['styles_loop_s']} s + encoding {row['styles_encode_s']} s = {row['styles_concept_s']} s "
            f"(naive loop {row['naive_styles_concept_s']} s) [{row['clock']} seconds]"
        )


if __name__ == "__main__":
    main()
