"""End-to-end inference cost of CPE adapters, measured against the base pipeline in the same run.

Every variant (base, CPE adapters with 1/10/100/1,000 concepts, 20 stacked adapters, a diffusers
PEFT LoRA of rank 1 on the same ``attn2.to_k``/``to_v`` projections) runs the same pipeline call;
variants are interleaved, several repetitions each, and the minimum and median time are reported
as ratios to the base. Also: peak extra memory, adapter file size per concept, and load time.

Models: ``tiny`` (cpe_adapter.testing's offline SD 1.x pipeline) and ``sd15`` (a full-size SD 1.5
architecture with random weights, built offline). Needs only torch, diffusers, transformers and
peft besides this checkout (``src/`` is put on the path).

    python benchmarks/inference.py --quick                     # smoke run, ~1 minute on a laptop CPU
    python benchmarks/inference.py --models tiny,sd15          # the CPU tables of docs/benchmarks.md
    python benchmarks/inference.py --models sd15 --device cuda --dtype float16   # 512 px, 50 steps, batch 2
    python benchmarks/inference.py --models tiny --compile     # adds torch.compile(pipe.unet) variants
    python benchmarks/inference.py --routing --models "" --no-files --threads 1   # per-prompt routing, SD 1.5 dims
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import diffusers
import torch

import cpe_adapter  # noqa: F401  (installs the pipeline methods)
from cpe_adapter import CPEAdapter, gate, routing
from cpe_adapter.runtime import get_runtime
from cpe_adapter.targets import denoiser_of, find_target_layers
from cpe_adapter.testing import sd15_random_pipeline, sd15_unet, tiny_pipeline

PROMPT = "a portrait of a famous painter in a garden, oil painting"
# Every call gets a prompt of its own (as a server does), so no variant is served a prompt's routing
# from memory; only the negative prompt ("") recurs, as it does in practice.
CALLS = itertools.count()


# ------------------------------------------------------------------------------------ models
def random_adapter(layers, count: int, seed: int, dtype: torch.dtype, device: str) -> CPEAdapter:
    """A names-preset adapter (r=1, m=16) with random nonzero weights: every concept routes and acts."""
    adapter = CPEAdapter.for_layers(layers, [f"concept {seed}-{i}" for i in range(count)], "names")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return adapter.to(device=device, dtype=dtype)


def module_bytes(*modules: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def pipeline_bytes(pipe) -> int:
    return module_bytes(denoiser_of(pipe), pipe.text_encoder, pipe.vae)


# ----------------------------------------------------------------------------------- variants
class Variant:
    """A named change to the pipeline, applied before a timed call and undone after it."""

    def __init__(
        self,
        name: str,
        setup: Callable[[], None],
        teardown: Callable[[], None],
        adapter_bytes: int = 0,
        adapter_names: list[str] | None = None,
    ):
        self.name, self.setup, self.teardown, self.adapter_bytes = name, setup, teardown, adapter_bytes
        self.adapter_names = adapter_names or []
        self.times: list[float] = []
        self.cache_bytes = 0
        self.cuda_peak = 0


def cpe_variant(pipe, name: str, adapters: list[CPEAdapter]) -> Variant:
    names = [f"{name}-{index}" for index in range(len(adapters))]

    def setup() -> None:
        for adapter_name, adapter in zip(names, adapters, strict=True):
            pipe.load_cpe_adapter(adapter, adapter_name)

    def teardown() -> None:
        pipe.unload_cpe_adapter(names)

    return Variant(name, setup, teardown, sum(module_bytes(a) for a in adapters), names)


def lora_variant(pipe, dtype: torch.dtype) -> Variant:
    from peft import LoraConfig

    unet = denoiser_of(pipe)
    config = LoraConfig(r=1, lora_alpha=1, init_lora_weights=False, target_modules=["attn2.to_k", "attn2.to_v"])

    def setup() -> None:
        torch.manual_seed(0)
        unet.add_adapter(config, adapter_name="peer")
        if dtype != torch.float32:
            unet.to(dtype=dtype)

    def teardown() -> None:
        unet.unload_lora()

    return Variant("lora r=1 (PEFT)", setup, teardown)


def without_route_memo(variant: Variant) -> Variant:
    """``variant`` with :class:`~cpe_adapter.routing.RouteMemo` off: every call routes every row."""
    capacity = routing.ROUTE_MEMO_ROWS

    def setup() -> None:
        routing.ROUTE_MEMO_ROWS = 0
        variant.setup()

    def teardown() -> None:
        variant.teardown()
        routing.ROUTE_MEMO_ROWS = capacity

    return Variant(f"{variant.name}, routing memo off", setup, teardown, variant.adapter_bytes)


def build_variants(
    pipe, concepts: list[int], stacked: int, dtype, device, lora: bool, memo_off: bool = False
) -> list[Variant]:
    layers = find_target_layers(denoiser_of(pipe))
    variants = [Variant("base", lambda: None, lambda: None)]
    for count in concepts:
        adapter = random_adapter(layers, count, count, dtype, device)
        variants.append(cpe_variant(pipe, f"cpe {count} concept{'s' * (count > 1)}", [adapter]))
    if memo_off and concepts:
        largest = random_adapter(layers, max(concepts), max(concepts), dtype, device)
        variants.append(without_route_memo(cpe_variant(pipe, f"cpe {max(concepts)} concepts off", [largest])))
    if stacked:
        adapters = [random_adapter(layers, 1, 1000 + i, dtype, device) for i in range(stacked)]
        variants.append(cpe_variant(pipe, f"cpe {stacked} stacked adapters", adapters))
    if lora:
        variants.append(lora_variant(pipe, dtype))
    return variants


# ------------------------------------------------------------------------------------- timing
def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_call(pipe, variant: Variant, args: argparse.Namespace, size: int, watched: bool = True) -> float:
    def watch(pipeline, step, timestep, kwargs):
        # The cache is filled at the first step and only read after it: sampling its size at the
        # first and last steps keeps this bookkeeping (which only erased variants pay) out of the
        # other steps' timing.
        runtime = get_runtime(denoiser_of(pipeline))
        if runtime is not None and watched and step in (0, args.steps - 1):
            variant.cache_bytes = max(variant.cache_bytes, runtime.cached_bytes() + runtime.routing_bytes())
        return {}

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    synchronize(args.device)
    start = time.perf_counter()
    with torch.no_grad():
        pipe(
            [f"{PROMPT}, study {next(CALLS)}"] * args.batch,
            height=size,
            width=size,
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            generator=torch.Generator(args.device).manual_seed(0),
            output_type="np",
            callback_on_step_end=watch,
        )
    synchronize(args.device)
    elapsed = time.perf_counter() - start
    if args.device.startswith("cuda"):
        variant.cuda_peak = max(variant.cuda_peak, torch.cuda.max_memory_allocated())
    return elapsed


def round_order(variants: list[Variant], rep: int) -> list[Variant]:
    """The variants of round ``rep``, rotated by one each round so that none always runs first
    (round -1, the warm-up, in the given order)."""
    if rep < 0:
        return variants
    return variants[rep % len(variants) :] + variants[: rep % len(variants)]


def run_interleaved(pipe, variants: list[Variant], args: argparse.Namespace, size: int) -> None:
    """Warm every variant once, then ``reps`` rounds, each round all variants in a rotated order."""
    for rep in range(-1, args.reps):
        order = round_order(variants, rep)
        for variant in order:
            variant.setup()
            try:
                if not args.cold:  # a server already serving: the negative prompt's routing is remembered
                    timed_call(pipe, variant, args, size, watched=False)
                elapsed = timed_call(pipe, variant, args, size)
            finally:
                variant.teardown()
            if rep >= 0:
                variant.times.append(elapsed)
        if rep >= 0:
            print(f"  round {rep + 1}/{args.reps} done", file=sys.stderr)


def report(title: str, pipe, variants: list[Variant], args: argparse.Namespace) -> dict[str, Any]:
    base = variants[0]
    base_min, base_med = min(base.times), statistics.median(base.times)
    base_bytes = pipeline_bytes(pipe)
    print(f"\n### {title}\n")
    print(f"base pipeline weights: {base_bytes / 2**20:.0f} MiB; min {base_min:.3f} s, median {base_med:.3f} s\n")
    header = "| variant | min s | median s | min ratio | median ratio | adapter MiB | cache MiB (% of base) |"
    print(header)
    print("|---|---|---|---|---|---|---|")
    rows = []
    for variant in variants:
        low, mid = min(variant.times), statistics.median(variant.times)
        extra = variant.cache_bytes
        row = {
            "variant": variant.name,
            "min_s": low,
            "median_s": mid,
            "min_ratio": low / base_min,
            "median_ratio": mid / base_med,
            "adapter_bytes": variant.adapter_bytes,
            "cache_bytes": extra,
            "times": variant.times,
        }
        if args.device.startswith("cuda"):
            row["cuda_peak_bytes"] = variant.cuda_peak
            row["cuda_peak_extra_bytes"] = variant.cuda_peak - base.cuda_peak
        rows.append(row)
        print(
            f"| {variant.name} | {low:.3f} | {mid:.3f} | {low / base_min:.3f}x | {mid / base_med:.3f}x | "
            f"{variant.adapter_bytes / 2**20:.1f} | {extra / 2**20:.2f} ({100 * extra / base_bytes:.2f}%) |"
        )
    if args.device.startswith("cuda"):
        print("\n| variant | CUDA peak MiB | extra over base MiB (% of base peak) |\n|---|---|---|")
        for row in rows:
            extra = row["cuda_peak_extra_bytes"]
            print(
                f"| {row['variant']} | {row['cuda_peak_bytes'] / 2**20:.0f} | {extra / 2**20:.1f} "
                f"({100 * extra / max(base.cuda_peak, 1):.2f}%) |"
            )
    return {"title": title, "base_pipeline_bytes": base_bytes, "rows": rows}


# -------------------------------------------------------------------------------- file sizes
def file_sizes(device: str) -> dict[str, Any]:
    """Bytes per concept of a names-preset adapter file on the SD 1.5 layout, fp32 and fp16, and load time."""
    with torch.device("meta"):
        layers = find_target_layers(sd15_unet())
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, label in ((torch.float32, "fp32"), (torch.float16, "fp16")):
            sizes = {}
            for count in (1, 10):
                folder = Path(tmp) / f"{label}-{count}"
                random_adapter(layers, count, count, dtype, "cpu").save_pretrained(folder, model_card=False)
                sizes[count] = (folder / "cpe_adapter.safetensors").stat().st_size
            loaded = CPEAdapter.from_pretrained(Path(tmp) / f"{label}-1")
            result[label] = {
                "bytes_per_concept": (sizes[10] - sizes[1]) / 9,
                "file_bytes_1_concept": sizes[1],
                "dtype_after_load": str(loaded.gate_a.dtype),
            }
        for count in (100, 1000):
            folder = Path(tmp) / f"fp32-{count}"
            random_adapter(layers, count, count, torch.float32, "cpu").save_pretrained(folder, model_card=False)
            result[f"load_{count}_concepts_s"] = best_load_time([folder], device)
            result[f"file_bytes_{count}_concepts"] = (folder / "cpe_adapter.safetensors").stat().st_size
        singles = []
        for index in range(20):
            singles.append(Path(tmp) / f"single-{index}")
            random_adapter(layers, 1, 2000 + index, torch.float32, "cpu").save_pretrained(singles[-1], model_card=False)
        result["load_20_stacked_s"] = best_load_time(singles, device)
    print("\n### Adapter files (names preset r=1, m=16, SD 1.5 layout: 32 projections, d=768)\n")
    print("| dtype | KB per concept | 1-concept file KB |\n|---|---|---|")
    for label in ("fp32", "fp16"):
        info = result[label]
        print(f"| {label} | {info['bytes_per_concept'] / 1000:.1f} | {info['file_bytes_1_concept'] / 1000:.1f} |")
    for count in (100, 1000):
        print(
            f"\nloading a {count}-concept fp32 adapter ({result[f'file_bytes_{count}_concepts'] / 1e6:.1f} MB) from "
            f"disk: {result[f'load_{count}_concepts_s']:.3f} s (best of 3)"
        )
    print(f"\nloading 20 one-concept adapters from disk: {result['load_20_stacked_s']:.3f} s (best of 3)")
    return result


def best_load_time(folders: list[Path], device: str) -> float:
    """Best of three: read, validate and place on ``device`` every adapter in ``folders``."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for folder in folders:
            CPEAdapter.from_pretrained(folder).to(device)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


# ------------------------------------------------------------------ per-step and per-prompt cost
def split_timing(pipe, variants: list[Variant], args: argparse.Namespace, size: int, setting: str) -> dict[str, Any]:
    """The UNet alone, split into what an eraser costs per denoising step and once per prompt.

    Per round and variant (interleaved, rotated): one untimed call on a prompt of its own (the
    negative prompt's routing is then remembered, as on a server), then the *first* call on a new
    prompt (routing, residual, integrity scan, K/V of every layer) and ``--split-steps`` further
    calls on that same prompt (served from the per-prompt cache), of which the fastest is the
    round's step time. "per-prompt extra" is the first call minus one cached step, against the
    same difference for the base.
    """
    unet = denoiser_of(pipe)
    device, dtype = unet.device, unet.dtype
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2 * args.batch, unet.config.in_channels, size // 8, size // 8, generator=generator)
    latents, timestep = latents.to(device, dtype), torch.tensor(500, device=device)

    def new_prompt() -> torch.Tensor:
        positive, negative = pipe.encode_prompt(f"{PROMPT}, study {next(CALLS)}", device, args.batch, True, "")
        return torch.cat([negative, positive])

    def unet_call(embeds: torch.Tensor) -> float:
        synchronize(args.device)
        start = time.perf_counter()
        with torch.no_grad():
            unet(latents, timestep, encoder_hidden_states=embeds)
        synchronize(args.device)
        return time.perf_counter() - start

    figures: dict[str, dict[str, list[float]]] = {v.name: {"first": [], "step": []} for v in variants}
    for rep in range(-1, args.reps):
        order = round_order(variants, rep)
        for variant in order:
            variant.setup()
            try:
                unet_call(new_prompt())
                embeds = new_prompt()
                first = unet_call(embeds)
                steps = [unet_call(embeds) for _ in range(args.split_steps)]
            finally:
                variant.teardown()
            if rep >= 0:
                figures[variant.name]["first"].append(first)
                figures[variant.name]["step"].append(min(steps))
    base = figures[variants[0].name]
    base_step = min(base["step"]), statistics.median(base["step"])
    base_extra = statistics.median(f - s for f, s in zip(base["first"], base["step"], strict=True))
    print(f"\n### {setting}: UNet per step and per prompt ({args.split_steps} cached steps per round)\n")
    print("| variant | step ms (min / median) | step ratio (min / median) | per-prompt extra ms (median) |")
    print("|---|---|---|---|")
    rows = []
    for variant in variants:
        times = figures[variant.name]
        step = min(times["step"]), statistics.median(times["step"])
        extra = statistics.median(f - s for f, s in zip(times["first"], times["step"], strict=True)) - base_extra
        rows.append({"variant": variant.name, "step_s": times["step"], "first_s": times["first"], "extra_s": extra})
        print(
            f"| {variant.name} | {step[0] * 1e3:.2f} / {step[1] * 1e3:.2f} | {step[0] / base_step[0]:.3f}x / "
            f"{step[1] / base_step[1]:.3f}x | {extra * 1e3:.2f} |"
        )
    return {"title": f"{setting}, split", "rows": rows}


# ------------------------------------------------------------------------ per-prompt routing
def softmax_routing(embeds: torch.Tensor, gate_a, gate_b, gate_v, chunk: int = 128):
    """The previous routing kernel, the baseline: normalised softmax, then a batched ``matmul`` for the
    gates; returns what :func:`cpe_adapter.gate.best_concepts` returns."""
    batch, tokens, dim = embeds.shape
    flat = embeds.reshape(batch * tokens, dim)
    projected = flat @ gate_v.T
    best_gate = best_index = best_rows = None
    for start in range(0, gate_a.shape[0], chunk):
        stop = min(start + chunk, gate_a.shape[0])
        queries = torch.matmul(flat, gate_a[start:stop]).view(stop - start, batch, tokens, -1)
        keys = torch.matmul(flat, gate_b[start:stop]).view(stop - start, batch, tokens, -1)
        mixing = torch.softmax(queries @ keys.transpose(-1, -2), dim=-1)
        columns = projected[:, start:stop].T.reshape(stop - start, batch, tokens, 1)
        gates = torch.sigmoid((mixing @ columns).squeeze(-1))
        index = gates.argmax(dim=0)
        found = gates.gather(0, index.unsqueeze(0)).squeeze(0)
        rows = mixing.gather(0, index[None, :, :, None].expand(1, *mixing.shape[1:])).squeeze(0)
        if best_gate is None:
            best_gate, best_index, best_rows = found, index, rows
            continue
        better = found > best_gate
        best_gate = torch.where(better, found, best_gate)
        best_index = torch.where(better, index + start, best_index)
        best_rows = torch.where(better.unsqueeze(-1), rows, best_rows)
    return best_gate, best_index, best_rows @ embeds


def routing_floor(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Seconds for the two kernels no exact routing can skip, on ready-made inputs: every concept's
    token-mixing logits ``(E A_c)(E B_c)^T`` (``N·B·T²·m`` multiply-adds) and their exponentials
    (``N·B·T²``, every one enters a softmax denominator), chunk by chunk as the routing forms them."""
    start = time.perf_counter()
    for queries, keys in factors:
        (queries @ keys.transpose(-1, -2)).exp2_()
    return time.perf_counter() - start


def routing_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """``gate.best_concepts`` + ``gate.routed_residual`` at SD 1.5 (d=768) or tiny (d=32) dimensions.

    Random gate and residual weights (every gate in play), one prompt batch of 77 tokens per call;
    routing, the previous softmax routing kernel (:func:`softmax_routing`, the baseline), the
    residual and the routing's arithmetic floor (:func:`routing_floor`) are timed interleaved, the
    first round warms up.
    """
    if args.routing_model == "tiny":
        layers = find_target_layers(tiny_pipeline("sd").unet)
    else:
        with torch.device("meta"):
            layers = find_target_layers(sd15_unet())
    sizes = [t.out_features for t in layers]
    dim, rank, tokens, batch = layers[0].in_features, 16, 77, 2 * args.batch
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(batch, tokens, dim, generator=generator)
    rows = []
    print(
        f"\n### Per-prompt routing, {args.routing_model} dimensions (d={dim}, m={rank}, {len(layers)} projections, "
        f"UNet batch {batch}, {torch.get_num_threads()} thread(s))\n"
    )
    print(
        "| concepts | routing ms (min / median) | previous kernel ms (min / median) | routing / previous (min) "
        "| residual ms (min / median) | floor ms (min) |\n|---|---|---|---|---|---|"
    )
    for count in (int(c) for c in args.concepts.split(",") if c):
        gate_a = torch.randn(count, dim, rank, generator=generator) * 0.05
        gate_b = torch.randn(count, dim, rank, generator=generator) * 0.05
        gate_v = torch.randn(count, dim, generator=generator) * 0.05
        down = torch.randn(count, dim, len(layers), generator=generator) * 0.05
        up = torch.randn(count, 1, sum(sizes), generator=generator) * 0.05
        times: dict[str, list[float]] = {"routing": [], "previous": [], "residual": [], "floor": []}
        factors = [
            (
                torch.matmul(embeds, gate_a[s : s + 128].unsqueeze(1)),
                torch.matmul(embeds, gate_b[s : s + 128].unsqueeze(1)),
            )
            for s in range(0, count, 128)
        ]
        with torch.no_grad():
            for _ in range(args.reps + 1):  # interleaved; the first round warms up
                start = time.perf_counter()
                _, index, mixed = gate.best_concepts(embeds, gate_a, gate_b, gate_v)
                times["routing"].append(time.perf_counter() - start)
                start = time.perf_counter()
                previous = softmax_routing(embeds, gate_a, gate_b, gate_v)
                times["previous"].append(time.perf_counter() - start)
                start = time.perf_counter()
                gate.routed_residual(mixed.reshape(-1, dim), index.reshape(-1), down, up, sizes, 1)
                times["residual"].append(time.perf_counter() - start)
                times["floor"].append(routing_floor(factors))
            torch.testing.assert_close(previous[2], mixed, rtol=1e-4, atol=1e-4)  # the same routing
        figures = {key: [t * 1e3 for t in value[1:]] for key, value in times.items()}
        rows.append({"concepts": count, **{f"{k}_ms": v for k, v in figures.items()}})
        low = {k: min(v) for k, v in figures.items()}
        mid = {k: statistics.median(v) for k, v in figures.items()}
        print(
            f"| {count} | {low['routing']:.2f} / {mid['routing']:.2f} | {low['previous']:.2f} / {mid['previous']:.2f} "
            f"| {low['routing'] / low['previous']:.2f}x | {low['residual']:.2f} / {mid['residual']:.2f} "
            f"| {low['floor']:.2f} |"
        )
    return {"routing": rows}


# --------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,sd15", help="comma-separated: tiny, sd15 (empty: files only)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 50 on cuda, 4 on cpu)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels for sd15 (cuda 512, cpu 128)")
    parser.add_argument("--batch", type=int, default=None, help="prompts per call, CFG doubles it (cuda 2, cpu 1)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--concepts", default="1,10,100,1000")
    parser.add_argument("--stacked", type=int, default=20)
    parser.add_argument("--no-lora", action="store_true", help="skip the PEFT LoRA peer")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(pipe.unet)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write all figures here")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 2 reps, up to 100 concepts")
    parser.add_argument("--routing", action="store_true", help="per-prompt routing micro-benchmark")
    parser.add_argument("--routing-model", default="sd15", choices=["sd15", "tiny"], help="dimensions for --routing")
    parser.add_argument(
        "--cold", action="store_true", help="time the first call after loading (default: after one untimed call)"
    )
    parser.add_argument("--memo-off", action="store_true", help="also time the most concepts with the routing memo off")
    parser.add_argument("--no-files", action="store_true", help="skip the adapter file size / load time section")
    parser.add_argument(
        "--split", action="store_true", help="time the UNet alone: per denoising step and once per prompt, eager"
    )
    parser.add_argument("--split-steps", type=int, default=20, help="cached steps per round with --split")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.quick:
        args.models, args.reps, args.concepts, args.stacked = "tiny", 2, "1,100", 4
    args.steps = args.steps or (50 if cuda else 4)
    args.batch = args.batch or (2 if cuda else 1)
    args.size = args.size or (512 if cuda else 128)
    return args


def run_model(model: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    dtype = getattr(torch, args.dtype)
    print(f"building {model} ...", file=sys.stderr)
    pipe = tiny_pipeline("sd") if model == "tiny" else sd15_random_pipeline()
    pipe = pipe.to(args.device, dtype)
    size = 64 if model == "tiny" else args.size
    concepts = [int(c) for c in args.concepts.split(",") if c]
    variants = build_variants(
        pipe, concepts, args.stacked, dtype, args.device, lora=not args.no_lora, memo_off=args.memo_off
    )
    setting = f"{args.device} {args.dtype}, {size} px, {args.steps} steps, batch {args.batch} (+CFG)"
    if args.split:
        return [split_timing(pipe, variants, args, size, f"{model}, eager, {args.device} {args.dtype}, {size} px")]
    run_interleaved(pipe, variants, args, size)
    results = [report(f"{model}, eager, {setting}", pipe, variants, args)]
    if args.compile:
        results.append(run_compiled(pipe, model, variants, args, size, setting))
    return results


def run_compiled(pipe, model: str, variants: list[Variant], args, size: int, setting: str) -> dict[str, Any]:
    """torch.compile(pipe.unet): the adapters stay loaded and the active set switches (no recompiles)."""
    import torch._dynamo

    counter = torch._dynamo.utils.counters
    original = pipe.unet
    cpe = [v for v in variants if v.adapter_names]
    for variant in cpe:
        variant.setup()

    def activate(names: list[str]) -> Callable[[], None]:
        return lambda: pipe.set_cpe_adapters(names)

    compiled_variants = [Variant("base (adapters disabled)", pipe.disable_cpe_adapters, pipe.enable_cpe_adapters)]
    compiled_variants += [Variant(v.name, activate(v.adapter_names), lambda: None, v.adapter_bytes) for v in cpe]
    pipe.unet = torch.compile(original, backend=args.compile_backend)
    try:
        run_interleaved(pipe, compiled_variants, args, size)
    finally:
        pipe.unet = original
        pipe.unload_cpe_adapter()
    result = report(f"{model}, torch.compile({args.compile_backend}), {setting}", pipe, compiled_variants, args)
    result["unique_graphs"] = int(counter["stats"]["unique_graphs"])
    print(f"\ngraphs compiled in this run: {result['unique_graphs']}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    figures: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__}
    if args.device.startswith("cuda"):
        figures["gpu"] = torch.cuda.get_device_name()
    if not args.no_files:
        figures["files"] = file_sizes(args.device)
    if args.routing:
        figures["routing"] = routing_benchmark(args)
    figures["runs"] = []
    for model in filter(None, (m.strip() for m in args.models.split(","))):
        figures["runs"] += run_model(model, args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
