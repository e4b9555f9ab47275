"""The ``cpe-adapter`` command line: train, generate, eval, inspect, push, convert, demo.

Exit codes: 0 on success, 2 on bad input (one-line reason on stderr), 1 on other failures.
``--json`` prints one machine-readable JSON object on stdout instead of the human summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import CPEAdapterError
from .recipes import RECIPES

TINY_PREFIX = "tiny:"


class UsageError(CPEAdapterError):
    """Bad command-line input."""


# ----------------------------------------------------------------------------------- helpers
def load_pipeline(base: str, device: str | None = None, dtype: str | None = None, progress: bool = False) -> Any:
    """A text-to-image pipeline from a Hub id, a local diffusers folder or ``tiny:<kind>``."""

    _check_device(device)
    if base.startswith(TINY_PREFIX):
        from .testing import KINDS, tiny_pipeline

        kind = base[len(TINY_PREFIX) :]
        if kind not in KINDS:
            raise UsageError(
                f"Unknown built-in base {base!r}; choose one of {', '.join(TINY_PREFIX + k for k in KINDS)}."
            )
        pipe = tiny_pipeline(kind)
    else:
        from diffusers import DiffusionPipeline

        kwargs: dict[str, Any] = {}
        if dtype:
            kwargs["torch_dtype"] = _dtype(dtype)
        try:
            pipe = DiffusionPipeline.from_pretrained(base, **kwargs)
        except (OSError, ValueError) as err:
            raise UsageError(f"Cannot load base model {base!r}: {err}") from err
    if device or dtype:
        pipe.to(device or "cpu", _dtype(dtype) if dtype else None)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe


def _check_device(device: str | None) -> None:
    """Refuse a device string torch does not know, or an accelerator this machine lacks."""
    if device is None:
        return
    from .training import checked_device

    try:
        checked_device(device, label="--device")
    except CPEAdapterError as err:
        raise UsageError(str(err)) from err


def _dtype(name: str) -> Any:
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
    table.update({"bfloat16": torch.bfloat16, "bf16": torch.bfloat16})
    if name not in table:
        raise UsageError(f"Unknown dtype {name!r}; choose float32, float16 or bfloat16.")
    return table[name]


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    print(json.dumps(payload, indent=2, default=str) if args.json else text)


def _concepts(args: argparse.Namespace) -> list[str]:
    concepts = list(args.erase or [])
    if args.erase_file:
        path = Path(args.erase_file)
        if not path.is_file():
            raise UsageError(f"--erase-file {path} does not exist.")
        lines = (line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines())
        concepts += [line for line in lines if line and not line.startswith("#")]
    if not concepts:
        raise UsageError("Nothing to erase: give --erase CONCEPT (repeatable) or --erase-file FILE.")
    return concepts


def _paraphrases(args: argparse.Namespace, concepts: list[str]) -> dict[str, list[str]] | None:
    """``--paraphrase TEXT`` (one concept) or ``--paraphrase CONCEPT=TEXT`` as ``train_cpe``'s mapping."""
    if not args.paraphrase:
        return None
    found: dict[str, list[str]] = {}
    for given in args.paraphrase:
        concept, sep, text = given.partition("=")
        if not sep or concept.strip() not in concepts:
            if len(concepts) != 1:
                raise UsageError(
                    f"--paraphrase {given!r}: with several concepts write CONCEPT=TEXT, CONCEPT one of {concepts}."
                )
            concept, text = concepts[0], given
        found.setdefault(concept.strip(), []).append(text.strip())
    return found


def _load_adapters(pipe: Any, sources: Sequence[str], scales: Sequence[float] | None = None) -> list[str]:
    from .loaders import load_cpe_adapter, set_cpe_adapters

    names = [load_cpe_adapter(pipe, source) for source in sources]
    if scales:
        if len(scales) != len(names):
            raise UsageError(f"Got {len(scales)} --scale values for {len(names)} adapters.")
        set_cpe_adapters(pipe, names, list(scales))
    return names


# ---------------------------------------------------------------------------------- commands
def cmd_inspect(args: argparse.Namespace) -> int:
    from .adapter import CPEAdapter
    from .provenance import verify_adapter

    adapter = CPEAdapter.from_pretrained(args.adapter)
    config = adapter.config
    warned = verify_adapter(adapter, base_model=args.base)
    reads = _text_width(args.base) if args.base else None
    if reads is not None and reads != config.text_embed_dim:
        warned.insert(
            0,
            f"incompatible with {args.base}: its UNet's cross-attention reads {reads}-d text embeddings, this "
            f"adapter was trained for {config.text_embed_dim}-d ones; it cannot be loaded there",
        )
    hash_ok = None if config.weights_sha256 is None else not any("weights_sha256" in w for w in warned)
    params = sum(p.numel() for p in adapter.parameters())
    compatible = (
        f"UNets with {len(config.target_layers)} cross-attention projections reading {config.text_embed_dim}-d "
        f"text (trained on {config.base_model or 'unknown'})"
    )
    info = {
        "concepts": [c.__dict__ for c in config.concepts],
        "parameters": params,
        "text_embed_dim": config.text_embed_dim,
        "layers": len(config.target_layers),
        "gate_rank": config.gate_rank,
        "residual_rank": config.residual_rank,
        "alpha": config.alpha,
        "tie_gate_qk": config.tie_gate_qk,
        "compatible_bases": compatible,
        "base_model": config.base_model,
        "base_model_revision": config.base_model_revision,
        "preset": config.preset,
        "library_version": config.library_version,
        "format_version": config.format_version,
        "weights_sha256": config.weights_sha256,
        "hash_verified": hash_ok,
        "warnings": warned,
    }
    verdict = {True: "verified", False: "MISMATCH", None: "not recorded"}[hash_ok]
    lines = [f"CPE adapter {args.adapter}"]
    lines += [f"  concept: {c.name!r} -> {c.neutral!r} (eta {c.eta})" for c in config.concepts]
    lines += [
        f"  size: {params:,} parameters, {len(config.target_layers)} projections, text dim {config.text_embed_dim}",
        f"  ranks: gate m={config.gate_rank}, residual r={config.residual_rank}, alpha={config.alpha}",
        f"  compatible bases: {compatible}",
        f"  provenance: preset {config.preset}, cpe-adapter {config.library_version}, weights hash {verdict}",
    ]
    _emit(args, info, "\n".join(lines))
    for warning in warned:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _text_width(base: str) -> int | None:
    """The text-embedding width a base model's UNet reads, from its config alone (None if unknown)."""
    if base.startswith(TINY_PREFIX):
        config = load_pipeline(base).unet.config
    else:
        from diffusers import UNet2DConditionModel

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # diffusers' own deprecation notices about download options
                config = UNet2DConditionModel.load_config(base, subfolder="unet")
        except (OSError, ValueError):  # offline, not a diffusers folder, no UNet: nothing to compare
            return None
    width = config.get("cross_attention_dim")
    if isinstance(width, (list, tuple)):
        width = width[0] if len(set(width)) == 1 else None
    return width if isinstance(width, int) else None


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_adapter

    if not Path(args.directory).is_dir():
        raise UsageError(f"{args.directory} is not a folder; push takes a saved adapter folder.")
    _check_repo_id(args.repo, "REPO")
    url = push_adapter(args.directory, args.repo, private=args.private, token=args.token, commit_message=args.message)
    _emit(args, {"repo": args.repo, "commit_url": url}, f"Pushed {args.directory} to {args.repo}: {url}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from .images import save_image_grid
    from .loaders import disable_cpe_adapters, enable_cpe_adapters

    out = Path(args.out)
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            raise UsageError(f"--{name} {value}: image sides must be positive multiples of 8.")
    image_format = Image.registered_extensions().get(out.suffix.lower())
    if image_format is None or image_format not in Image.SAVE:
        raise UsageError(f"--out {out}: {out.suffix!r} is no image format Pillow writes; use a .png or .jpg name.")
    if out.is_dir() or any(p.exists() and not p.is_dir() for p in out.parents):
        raise UsageError(f"--out {out}: a folder is in the way (or a file where a folder goes); name an image file.")
    pipe = load_pipeline(args.base, args.device, args.dtype, progress=not args.json)
    limit = getattr(getattr(pipe, "scheduler", None), "config", {}).get("num_train_timesteps")
    if isinstance(limit, int) and args.steps >= limit:
        raise UsageError(f"--steps {args.steps}: this model's scheduler allows fewer than {limit} steps.")
    names = _load_adapters(pipe, args.adapter, args.scale)

    def render() -> Any:
        generator = torch.Generator("cpu").manual_seed(args.seed)
        kwargs = {"num_inference_steps": args.steps, "generator": generator}
        if args.height or args.width:  # a side not given is the other one's
            kwargs.update(height=args.height or args.width, width=args.width or args.height)
        return pipe(args.prompt, **kwargs).images[0]

    after = render()
    images, titles = [after], [f"erased ({', '.join(names)})"]
    if args.compare:
        disable_cpe_adapters(pipe)
        images, titles = [render(), after], ["original", titles[0]]
        enable_cpe_adapters(pipe)
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        after.save(out)
    else:
        save_image_grid(images, titles, out, suptitle=args.prompt)
    _emit(args, {"out": str(out), "adapters": names}, f"Wrote {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .config import CONFIG_NAME
    from .training import train_cpe

    concepts = _concepts(args)
    paraphrases = _paraphrases(args, concepts)
    out = _output_folder(args.out, "the trained adapter")
    _check_repo_id(args.push_to_hub, "--push-to-hub")
    checkpoints = Path(args.resume) if args.resume else out / "checkpoints"
    if (checkpoints / "checkpoints").is_dir():
        checkpoints = checkpoints / "checkpoints"
    if args.resume and not checkpoints.is_dir():
        raise UsageError(f"--resume {args.resume}: no checkpoint folder there.")
    if not args.resume and not args.overwrite and ((out / CONFIG_NAME).exists() or checkpoints.is_dir()):
        raise UsageError(
            f"--out {out} already holds an adapter or the checkpoints of a run; pass --resume {out} to finish "
            "that run, --overwrite to replace it, or another --out."
        )
    args.checkpoint_folder = checkpoints  # named by the Ctrl-C message
    if args.overwrite and not args.resume and checkpoints.is_dir():
        shutil.rmtree(checkpoints)  # a fresh run: old checkpoints would be mistaken for its own
    pipe = load_pipeline(args.base, args.device, args.dtype)
    overrides: dict[str, Any] = {}
    if args.neutral is not None:
        overrides["neutral"] = args.neutral  # an empty one is refused by the preset check
    started = time.perf_counter()
    adapter = train_cpe(
        pipe,
        concepts,
        preset=args.preset,
        steps=args.steps,
        seed=args.seed,
        device=args.device,
        progress=not args.json,
        checkpoint_dir=checkpoints,
        resume_from=checkpoints if args.resume else None,
        recipe=args.recipe,
        paraphrases=paraphrases,
        **overrides,
    )
    seconds = time.perf_counter() - started
    adapter.config.base_model = adapter.config.base_model or args.base
    adapter.save_pretrained(out)
    payload = {"out": str(out), "concepts": concepts, "preset": args.preset, "seconds": round(seconds, 2)}
    payload["losses"] = adapter.config.training.get("final_loss")
    if args.push_to_hub:
        payload["commit_url"] = adapter.push_to_hub(args.push_to_hub)
    _emit(args, payload, f"Trained an eraser for {concepts} in {seconds:.1f} s; saved to {out}")
    return 0


# ``eval --suite``: how many neighbours are retained by default, and the `evaluate` budgets.
EVAL_SUITES: dict[str, dict[str, int]] = {
    "quick": {"retained": 5, "attack_budget": 256, "attack_prompts": 1, "embedding_steps": 50, "image_prompts": 2},
    "full": {"retained": 20, "attack_budget": 1024, "attack_prompts": 3, "embedding_steps": 200, "image_prompts": 5},
}


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate
    from .report import MissingExtraError

    suite = dict(EVAL_SUITES[args.suite])
    neighbours = suite.pop("retained")
    out = _output_folder(args.out, "the report")
    if args.record:
        _check_record_target(args.adapter)
    pipe = load_pipeline(args.base, args.device, args.dtype)
    names = _load_adapters(pipe, args.adapter)
    configs = [c for name, c in __import__("cpe_adapter").list_cpe_adapters(pipe).items() if name in names]
    known = list(dict.fromkeys(c.name for config in configs for c in config.concepts))
    missing = [e for e in args.erase or [] if e.casefold() not in {k.casefold() for k in known}]
    if missing:
        raise UsageError(f"--erase {missing}: no given --adapter erases it (they erase {known}).")
    erased = args.erase or known
    retained = args.retain or _default_retained(pipe, configs, erased, neighbours)
    report = evaluate(
        pipe,
        erased,
        retained,
        attack=not args.no_attack,
        images=args.images,
        seed=args.seed,
        progress=not args.json,
        **suite,
    )
    for warning in report.warnings():
        print(f"cpe-adapter eval: warning: {warning}", file=sys.stderr)
    try:
        report.save(out)
        wrote = "report.json, report.md and plots"
    except MissingExtraError as err:  # the text files are written before the plots are tried
        print(f"cpe-adapter eval: warning: plots skipped: {_one_line(err)}", file=sys.stderr)
        wrote = "report.json and report.md"
    if args.record:
        from .hub import record_evaluation

        record_evaluation(args.adapter[0], {**report.card_figures(), "evaluated_with": _eval_command(args)})
        wrote += f"; recorded the figures in {args.adapter[0]} (cpe_config.json and README.md)"
    _emit(args, report.to_dict(), report.to_markdown() + f"\nWrote {out}/{wrote}")
    return 0


def _check_record_target(adapters: Sequence[str]) -> None:
    """Check, before any work, what ``eval --record`` writes its figures into: one local folder saved
    by ``save_pretrained`` whose weights still match their recorded hash (figures must describe the
    weights beside them)."""
    from .config import WEIGHTS_NAME
    from .hub import load_unchanged_folder

    folder = Path(adapters[0])
    if len(adapters) != 1 or not (folder / WEIGHTS_NAME).is_file():
        raise UsageError(
            f"--record writes the figures into one saved adapter folder (holding {WEIGHTS_NAME}); got --adapter "
            f"{list(adapters)}. Evaluate a stack without --record, or save the adapter to a folder first."
        )
    load_unchanged_folder(folder)


def _eval_command(args: argparse.Namespace) -> str:
    """How the recorded figures were measured, for the model card."""
    options = [f"--base {shlex.quote(args.base)}", f"--suite {args.suite}", f"--seed {args.seed}"]
    options += [f"--erase {shlex.quote(e)}" for e in args.erase or []]
    options += [f"--retain {shlex.quote(r)}" for r in args.retain or []]
    options += [f"--{key} {shlex.quote(getattr(args, key))}" for key in ("device", "dtype") if getattr(args, key)]
    options += ["--no-attack"] * args.no_attack + ["--images"] * args.images
    return "cpe-adapter eval " + " ".join(options)


def _default_retained(pipe: Any, configs: Sequence[Any], erased: Sequence[str], count: int) -> list[str]:
    """The ``count`` pool concepts nearest the erased ones under the pipeline's own text encoder
    (taken in turn from each erased concept's list): the neighbours an eraser is likeliest to hurt."""
    from .pools import concept_pool
    from .training_data import similar_concepts

    fallback = next((c.preset for c in configs if c.preset), "styles")
    domains = {s.name.casefold(): c.preset or fallback for c in configs for s in c.concepts}
    lowered = [e.lower() for e in erased]

    def pool(domain: str) -> list[str]:
        return [p for p in concept_pool(domain) if not any(e in p.lower() or p.lower() in e for e in lowered)]

    nearest = [similar_concepts(pipe, c, pool(domains.get(c.casefold(), fallback)), count) for c in erased]
    retained: list[str] = []
    for rank in range(count):
        for names in nearest:
            if rank < len(names) and names[rank] not in retained:
                retained.append(names[rank])
    return retained[:count]


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import run_convert

    return run_convert(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _output_folder(args.out, "the demo")
    result = run_demo(out_dir=args.out, steps=args.steps, progress=not args.json, kind=args.kind)
    if args.json:
        for note in result["notes"]:  # on stdout only in the JSON; said on stderr too
            print(f"cpe-adapter demo: {note}", file=sys.stderr)
    _emit(args, result, result.pop("text", ""))
    return 0


# ------------------------------------------------------------------------------------ parser
def _positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _seed(text: str) -> int:
    """An argparse type: a seed torch's generators take (0 <= seed < 2**63)."""
    value = int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**63 - 1, got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr, like every other bad input of the CLI
    (argparse prints its whole usage block first), naming the ``--help`` to read."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cpe-adapter", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="print a machine-readable JSON result")
        p.set_defaults(handler=handler)
        return p

    from .testing import KINDS

    tiny = ", ".join(TINY_PREFIX + kind for kind in KINDS)
    base_help = f"Hub id or local diffusers folder of the base model (built-in tiny pipelines: {tiny})"
    p = command("train", cmd_train, "Train an eraser for one or more concepts.")
    p.add_argument("--base", required=True, help=base_help)
    p.add_argument("--erase", action="append", help="concept to erase (repeatable)")
    p.add_argument("--erase-file", help="file with one concept per line")
    p.add_argument(
        "--preset",
        default="names",
        choices=["names", "styles", "explicit"],
        help="kind of concept: names (people, moved toward 'a person'; the default), styles (artists, toward "
        "'real photograph'), explicit",
    )
    p.add_argument("--neutral", help="phrase the concepts are moved toward (default: the preset's)")
    p.add_argument(
        "--recipe", choices=sorted(RECIPES), help="target-set recipe (default: paper, the method as published)"
    )
    p.add_argument(
        "--paraphrase",
        action="append",
        metavar="TEXT",
        help="another way to say the concept, erased with it (repeatable; CONCEPT=TEXT when erasing several)",
    )
    p.add_argument("--out", required=True, help="output folder (its checkpoints/ subfolder makes --resume possible)")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter or checkpoints already in --out")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload to this Hub repo")
    p.add_argument("--seed", type=_seed, default=0, help="training seed (default 0; same seed, same weights)")
    p.add_argument("--steps", type=_positive, help="total erase iterations (default: the preset's schedule)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", help="dtype of the base model while encoding prompts (training runs in fp32)")
    p.add_argument("--resume", metavar="DIR", help="checkpoint folder of an interrupted run")

    p = command("generate", cmd_generate, "Generate an image with erasers applied.")
    p.add_argument("--base", required=True, help=base_help)
    p.add_argument("--adapter", action="append", required=True, help="adapter folder, file or Hub id (repeatable)")
    p.add_argument("--scale", action="append", type=float, help="per-adapter scale (repeatable, in order)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--compare", action="store_true", help="write a before/after grid")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--steps", type=_positive, default=30, help="denoising steps (default 30)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, help="image width in pixels (default: --height, else the model's)")
    p.add_argument("--device")
    p.add_argument("--dtype")

    p = command("eval", cmd_eval, "Evaluate erasers: erasure, preservation, attacks; writes a report.")
    p.add_argument("--base", required=True, help=base_help)
    p.add_argument("--adapter", action="append", required=True, help="adapter folder, file or Hub id (repeatable)")
    p.add_argument("--erase", action="append", help="erased concept to test (default: the adapters' concepts)")
    p.add_argument("--retain", action="append", help="concept that must be preserved (repeatable)")
    p.add_argument(
        "--suite",
        choices=list(EVAL_SUITES),
        default="quick",
        help="size of the evaluation: quick = the 5 nearest pool concepts retained, a prompt attack of 256 "
        "candidates on 1 prompt per concept, 50 embedding-attack steps, 2 image prompts; full = 20, 1024 on 3 "
        "prompts, 200, 5",
    )
    p.add_argument("--no-attack", action="store_true", help="skip the red-teaming attacks")
    p.add_argument("--images", action="store_true", help="also measure image shifts (slower)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--record",
        action="store_true",
        help="also write the overall figures into the evaluated adapter's folder (its cpe_config.json and model "
        "card), so that a later push publishes them; needs exactly one --adapter, a saved folder",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of the attacks and images (default 0)")
    p.add_argument("--device")
    p.add_argument("--dtype")

    p = command("inspect", cmd_inspect, "Show an adapter's concepts, sizes, dimensions and provenance.")
    p.add_argument("adapter", help="adapter folder, .safetensors file or Hub id")
    p.add_argument("--base", help="warn when the adapter was trained on another base model")

    p = command(
        "push",
        cmd_push,
        "Upload a saved adapter folder to the Hub: its weights and cpe_config.json as they are, and its model card "
        "(the generated part renewed, the rest kept); a folder whose weights changed after saving is refused.",
    )
    p.add_argument("directory", help="a folder written by save_pretrained or `cpe-adapter train`")
    p.add_argument("repo", help="Hub repo id, e.g. my-org/erase-vangogh (a bare name goes to your namespace)")
    p.add_argument("--private", action="store_true", default=None, help="create the repo private (if it is new)")
    p.add_argument("--token", help="Hub token (default: the one huggingface_hub has stored)")
    p.add_argument("--message", help="commit message")

    from .convert import add_convert_arguments

    help_text = "Convert reference-implementation CPE checkpoints to this format."
    add_convert_arguments(sub.add_parser("convert", help=help_text, description=help_text)).set_defaults(
        handler=cmd_convert
    )

    p = command("demo", cmd_demo, "Offline demo: train, save, reload, stack and evaluate on a tiny pipeline.")
    p.add_argument(
        "--out", default="outputs/demo", help="where the demo writes its adapters and report (default: outputs/demo)"
    )
    p.add_argument("--steps", type=_positive, help="erase iterations (default: a short schedule)")
    p.add_argument(
        "--kind",
        default="sd-semantic",
        choices=["sd", "sd2", "sdxl", "sd-semantic"],
        help="built-in tiny pipeline (default sd-semantic: a real pretrained text encoder; falls back to sd "
        "when it is not installed)",
    )
    return parser


def _output_folder(path: str, what: str) -> Path:
    """``path`` as a folder to write into, refused before any work if it is an existing file or
    cannot be created."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} is an existing file; {what} needs a folder.")
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK)):
        raise UsageError(f"--out {folder}: {existing} cannot hold {what} (not a writable folder).")
    return folder


def _check_repo_id(repo_id: str | None, flag: str) -> None:
    """Refuse a malformed repo id before any work (training, uploading), not after."""
    if repo_id is None:
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UsageError(f"{flag} {repo_id!r} is not a valid Hub repo id ({err}).") from err


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _version() -> str:
    from . import __version__

    return __version__


def _quiet_transformers() -> None:
    """Show transformers' errors only (not, for instance, the notice that the image processors
    diffusers' pipelines import fall back to PIL without torchvision), unless the user set
    ``TRANSFORMERS_VERBOSITY``. transformers is already imported with this package, so the
    environment variable would be read too late: set the level directly."""
    if "TRANSFORMERS_VERBOSITY" in os.environ:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_transformers()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        code = int(exit_.code or 0)
        if code and "--json" in (sys.argv[1:] if argv is None else list(argv)):
            print(json.dumps({"error": "invalid arguments (see the message on stderr)", "exit_code": code}))
        return code
    import torch

    try:
        with torch.inference_mode(args.command in ("generate", "inspect")):
            return int(args.handler(args) or 0)
    except (CPEAdapterError, FileNotFoundError) as err:
        return _fail(args, 2, f"error: {_one_line(err)}")
    except KeyboardInterrupt:
        return _fail(args, 130, f"interrupted{_resume_hint(args)}")
    except Exception as err:
        return _fail(args, 1, f"failed: {type(err).__name__}: {_one_line(err)}")


def _resume_hint(args: argparse.Namespace) -> str:
    """What an interrupted ``train`` left: the folder to ``--resume`` from, or that nothing was saved."""
    folder = getattr(args, "checkpoint_folder", None)
    if args.command != "train" or folder is None:
        return ""
    from .checkpoints import CHECKPOINT_STATE

    if (Path(folder) / CHECKPOINT_STATE).is_file():
        return f"; finish the run with --resume {folder}"
    return "; no stage had finished, so nothing was saved: run the command again"


def _fail(args: argparse.Namespace, code: int, reason: str) -> int:
    """One line on stderr; with ``--json`` also ``{"error": ..., "exit_code": ...}`` on stdout."""
    print(f"cpe-adapter {args.command}: {reason}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": reason, "exit_code": code}))
    return code
