"""Convert checkpoints of the paper's reference implementation into cpe-adapter adapters.

The reference code saves one safetensors file per erased concept, every tensor with a leading
concept axis of size 1:

- the gate, shared by all layers: ``...attention_module1.w_qs.weight`` ``[1, d, m]`` (``A``),
  ``...w_ks.weight`` ``[1, d, m]`` and ``...gate.scaler.weight`` ``[1, d, 1]`` (``v``);
- per cross-attention projection, LoRA-style names ``lora_unet_<module path, '.' -> '_'>`` with
  ``.lora_down.weight`` ``[1, d, r]`` (``D_l``), ``.lora_up.weight`` ``[1, r, d_out]`` (``U_l``)
  and ``.alpha`` (a scalar); the residual is scaled by ``alpha / r``.

In that code the token mixing used ``A`` on both sides, ``softmax((E A)(E A)^T)``, so ``w_ks``
never trained: converted adapters set ``tie_gate_qk=True`` (``w_ks`` is kept as ``gate.B`` for
provenance only, and may be absent). Module names are resolved against the target pipeline's own
projection names, so no naming table is hard-coded; many per-concept files merge into one adapter,
concept axis in the order given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import CPEAdapter, base_model_info
from .config import CONFIG_NAME, TargetLayer
from .errors import CPEAdapterError
from .presets import get_preset
from .serialization import load_weights
from .targets import denoiser_of, find_target_layers

LAYER_PREFIX = "lora_unet_"
QUERY_SUFFIX = "w_qs.weight"
KEY_SUFFIX = "w_ks.weight"
SCALER_SUFFIX = "scaler.weight"
DOWN_SUFFIX = ".lora_down.weight"
UP_SUFFIX = ".lora_up.weight"
ALPHA_SUFFIX = ".alpha"
REFERENCE_FORMAT = "cpe-reference"
TINY_PREFIX = "tiny:"


@dataclass
class ReferenceConcept:
    """One reference checkpoint, read and checked against the target layers (concept axis dropped)."""

    source: str
    gate_a: torch.Tensor
    gate_b: torch.Tensor
    gate_v: torch.Tensor
    down: dict[str, torch.Tensor]
    up: dict[str, torch.Tensor]
    alpha: float

    @property
    def gate_rank(self) -> int:
        return int(self.gate_a.shape[-1])

    @property
    def residual_rank(self) -> int:
        return int(next(iter(self.down.values())).shape[-1])


def reference_layer_names(target_layers: Sequence[TargetLayer]) -> dict[str, TargetLayer]:
    """``lora_unet_<path with '_'>`` -> target layer; refuses layouts where two paths would collide."""
    mapping: dict[str, TargetLayer] = {}
    for layer in target_layers:
        key = LAYER_PREFIX + layer.name.replace(".", "_")
        if key in mapping:
            raise CPEAdapterError(
                f"Layers {mapping[key].name!r} and {layer.name!r} both map to the reference name {key!r}; "
                "this model cannot be matched unambiguously."
            )
        mapping[key] = layer
    return mapping


def _one_key(tensors: dict[str, torch.Tensor], suffix: str, source: str) -> str:
    keys = [k for k in tensors if k.endswith(suffix)]
    if len(keys) != 1:
        found = "none" if not keys else ", ".join(sorted(keys))
        raise CPEAdapterError(
            f"{source}: expected exactly one gate tensor ending in {suffix!r}, found {found}. Is this a checkpoint "
            "of the CPE reference implementation?"
        )
    return keys[0]


def _shaped(tensor: torch.Tensor, shape: tuple[int, ...], what: str, source: str, hint: str) -> torch.Tensor:
    if tuple(tensor.shape) != shape:
        raise CPEAdapterError(f"{source}: {what} has shape {list(tensor.shape)}, expected {list(shape)}. {hint}")
    if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
        raise CPEAdapterError(f"{source}: {what} must hold finite floating-point values; the file is corrupt.")
    return tensor.to(torch.float32)


def read_reference_checkpoint(
    tensors: dict[str, torch.Tensor], target_layers: Sequence[TargetLayer], source: str = "checkpoint"
) -> ReferenceConcept:
    """Check one reference checkpoint's tensors against ``target_layers`` and strip the concept axis."""
    layers = reference_layer_names(target_layers)
    d = target_layers[0].in_features
    wrong_model = "The checkpoint was trained for another base model."
    query_key = _one_key(tensors, QUERY_SUFFIX, source)
    scaler_key = _one_key(tensors, SCALER_SUFFIX, source)
    query = tensors[query_key]
    if query.dim() != 3 or query.shape[0] != 1:
        raise CPEAdapterError(f"{source}: {query_key} has shape {list(query.shape)}, expected [1, {d}, m].")
    m = int(query.shape[-1])
    gate_a = _shaped(query, (1, d, m), query_key, source, wrong_model)[0]
    gate_v = _shaped(tensors[scaler_key], (1, d, 1), scaler_key, source, wrong_model)[0, :, 0]
    used = {query_key, scaler_key}
    # w_ks never influenced the reference's outputs (tied mixing); a file without it converts the same.
    if any(k.endswith(KEY_SUFFIX) for k in tensors):
        key_key = _one_key(tensors, KEY_SUFFIX, source)
        gate_b = _shaped(tensors[key_key], (1, d, m), key_key, source, wrong_model)[0]
        used.add(key_key)
    else:
        gate_b = gate_a.clone()

    missing = [
        key + suffix
        for key in layers
        for suffix in (DOWN_SUFFIX, UP_SUFFIX, ALPHA_SUFFIX)
        if key + suffix not in tensors
    ]
    if missing:
        raise CPEAdapterError(
            f"{source}: {len(missing)} layer tensors are missing, e.g. {missing[:3]}. The checkpoint does not "
            f"cover this model's {len(layers)} cross-attention projections (another base model, or a truncated file)."
        )
    first_down = tensors[next(iter(layers)) + DOWN_SUFFIX]
    r = int(first_down.shape[-1]) if first_down.dim() == 3 else 0
    down, up, alphas = {}, {}, {}
    for key, layer in layers.items():
        down[layer.name] = _shaped(tensors[key + DOWN_SUFFIX], (1, d, r), key + DOWN_SUFFIX, source, wrong_model)[0]
        up[layer.name] = _shaped(
            tensors[key + UP_SUFFIX], (1, r, layer.out_features), key + UP_SUFFIX, source, wrong_model
        )[0]
        alpha = tensors[key + ALPHA_SUFFIX]
        if alpha.numel() != 1 or not torch.isfinite(alpha.to(torch.float64)).all():
            raise CPEAdapterError(f"{source}: {key + ALPHA_SUFFIX} must be one finite number, got {list(alpha.shape)}.")
        alphas[layer.name] = float(alpha.reshape(()).item())
        used.update(key + suffix for suffix in (DOWN_SUFFIX, UP_SUFFIX, ALPHA_SUFFIX))
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise CPEAdapterError(
            f"{source}: unexpected tensors {unexpected[:3]} (of {len(unexpected)}); they match no cross-attention "
            "projection of this model. The checkpoint was made for another base model."
        )
    if len(set(alphas.values())) != 1:
        raise CPEAdapterError(
            f"{source}: the layers have different alpha values {sorted(set(alphas.values()))}; cpe-adapter uses one "
            "alpha per adapter. Rescale each layer's lora_up by alpha_l / alpha and store one alpha."
        )
    return ReferenceConcept(source, gate_a, gate_b, gate_v, down, up, next(iter(alphas.values())))


def _concept_from_path(path: Path) -> str:
    return path.stem.replace("_", " ").replace("-", " ").strip()


def convert_reference_checkpoints(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    pipe_or_unet: Any,
    concepts: Sequence[str] | None = None,
    neutral: str | None = None,
    preset: str = "names",
    *,
    eta: float | None = None,
    name: str | None = None,
    base_model: str | None = None,
) -> CPEAdapter:
    """Merge reference checkpoints (one per concept) into one :class:`CPEAdapter` for ``pipe_or_unet``.

    Args:
        paths: the ``.safetensors`` files, one per concept; the concept axis follows this order.
        pipe_or_unet: the pipeline (or UNet) the checkpoints were trained for; layer names and
            dimensions are read from it.
        concepts: concept names, one per file (default: each file's stem, '_' and '-' as spaces).
        neutral: neutral phrase recorded for every concept (default: the preset's).
        preset: preset recorded in the config ("names", "styles", "explicit"); also the default
            ``neutral`` and ``eta``.
        eta: erase over-shoot recorded per concept (default: the preset's).
        name: the adapter's default name when loaded.
        base_model: base model id recorded in the config (default: read from the model).

    Returns:
        An adapter with ``tie_gate_qk=True`` whose residuals equal the reference code's.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = [Path(p) for p in paths]
    if not files:
        raise CPEAdapterError("No reference checkpoints given; pass one .safetensors file per concept.")
    names = [_concept_from_path(f) for f in files] if concepts is None else list(concepts)
    if len(names) != len(files):
        raise CPEAdapterError(f"Got {len(names)} concept names for {len(files)} files; pass one name per file.")
    if any(not isinstance(n, str) or not n.strip() for n in names):
        raise CPEAdapterError(f"Concept names must be non-empty strings, got {names}.")
    if len({f.resolve() for f in files}) != len(files):
        raise CPEAdapterError("The same checkpoint file is given twice; convert each concept once.")
    if len({n.strip().casefold() for n in names}) != len(names):
        raise CPEAdapterError(f"A concept is named twice in {names}; convert each concept once.")
    phrase = get_preset(preset).neutral if neutral is None else neutral
    if not isinstance(phrase, str) or not phrase.strip():
        raise CPEAdapterError(f"The neutral phrase must be non-empty, got {phrase!r}.")
    selfish = [n for n in names if n.strip().casefold() == phrase.strip().casefold()]
    if selfish:
        raise CPEAdapterError(f"{selfish} would be recorded as mapped toward itself; pass another --neutral.")
    denoiser = denoiser_of(pipe_or_unet)
    layers = find_target_layers(denoiser)
    for file in files:
        if not file.is_file():
            raise CPEAdapterError(f"{file} does not exist; pass the reference .safetensors files.")
    read = [read_reference_checkpoint(load_weights(f), layers, str(f)) for f in files]
    ranks = {(c.gate_rank, c.residual_rank) for c in read}
    if len(ranks) != 1:
        raise CPEAdapterError(
            f"The checkpoints have different (gate rank, residual rank) pairs {sorted(ranks)}; only checkpoints "
            "with equal ranks can be merged. Convert them into separate adapters and load them together."
        )
    alphas = {c.alpha for c in read}
    if len(alphas) != 1:
        raise CPEAdapterError(
            f"The checkpoints have different alpha values {sorted(alphas)}; convert them into separate adapters "
            "and load them together."
        )
    (gate_rank, residual_rank), alpha = ranks.pop(), alphas.pop()
    overrides: dict[str, Any] = {
        "gate_rank": gate_rank,
        "residual_rank": residual_rank,
        "alpha": alpha,
        "tie_gate_qk": True,
        "name": name,
        "base_model": base_model or base_model_info(pipe_or_unet, denoiser)[0],
    }
    if neutral is not None:
        overrides["neutral"] = neutral
    if eta is not None:
        overrides["eta"] = eta
    adapter = CPEAdapter.for_layers(layers, names, preset, **overrides)
    tensors = {
        "gate.A": torch.stack([c.gate_a for c in read]),
        "gate.B": torch.stack([c.gate_b for c in read]),
        "gate.v": torch.stack([c.gate_v for c in read]),
    }
    for layer in layers:
        tensors[f"{layer.name}.down"] = torch.stack([c.down[layer.name] for c in read])
        tensors[f"{layer.name}.up"] = torch.stack([c.up[layer.name] for c in read])
    adapter.load_file_state_dict(tensors)
    adapter.config.training = {
        **adapter.config.training,
        "converted_from": [f.name for f in files],
        "source_format": REFERENCE_FORMAT,
    }
    return adapter


# ----------------------------------------------------------------------------------------- CLI
def load_unet_skeleton(model: str) -> nn.Module:
    """The UNet of ``model`` (Hub id, pipeline folder or UNet folder) built on the meta device.

    Conversion needs only layer names and dimensions, so no weights are downloaded or read.
    ``tiny:<kind>`` names a built-in tiny pipeline (:func:`cpe_adapter.testing.tiny_pipeline`).
    """
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    if model.startswith(TINY_PREFIX):
        from .testing import KINDS, tiny_pipeline

        kind = model[len(TINY_PREFIX) :]
        if kind not in KINDS:
            raise CPEAdapterError(f"Unknown tiny pipeline {model!r}; use one of {[TINY_PREFIX + k for k in KINDS]}.")
        return tiny_pipeline(kind).unet
    local = Path(model)
    subfolder: str | None = "unet"
    if local.is_dir() and not (local / "unet").is_dir() and (local / "config.json").is_file():
        subfolder = None
    try:
        config = UNet2DConditionModel.load_config(model, subfolder=subfolder)
    except (OSError, ValueError) as err:
        raise CPEAdapterError(
            f"Cannot read the UNet config of {model!r} ({err}). Pass a Hub id or a local folder in diffusers layout."
        ) from err
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    return unet


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``convert`` options to ``parser`` (lets the main CLI reuse them as a sub-command)."""
    parser.add_argument("files", nargs="+", metavar="FILE", help="reference .safetensors files, one per concept")
    parser.add_argument("--base", required=True, metavar="MODEL", help="Hub id or local diffusers folder")
    parser.add_argument(
        "--concept",
        action="append",
        metavar="NAME",
        help="concept name of each FILE, in order (repeat; default: file names)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write the adapter to")
    parser.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    parser.add_argument("--preset", default="names", help="names | styles | explicit (default: names)")
    parser.add_argument("--neutral", default=None, help="neutral phrase (default: the preset's)")
    parser.add_argument("--name", default=None, help="default adapter name")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Run a parsed ``convert`` command; raises :class:`CPEAdapterError` on bad input."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CPEAdapterError(f"--out {out} is an existing file; the adapter needs a folder.")
    if not args.overwrite and ((out / CONFIG_NAME).exists() or (out / "checkpoints").is_dir()):
        raise CPEAdapterError(
            f"--out {out} already holds an adapter or the checkpoints of a training run; pass --overwrite to "
            "replace it, or another --out."
        )
    unet = load_unet_skeleton(args.base)
    adapter = convert_reference_checkpoints(
        args.files,
        unet,
        concepts=args.concept,
        neutral=args.neutral,
        preset=args.preset,
        name=args.name,
        base_model=args.base,
    )
    if (out / "checkpoints").is_dir():  # --overwrite: the old adapter's training checkpoints go with it
        shutil.rmtree(out / "checkpoints")
    folder = adapter.save_pretrained(out)
    summary = {
        "out": str(folder),
        "concepts": adapter.config.concept_names,
        "layers": len(adapter.config.target_layers),
        "gate_rank": adapter.config.gate_rank,
        "residual_rank": adapter.config.residual_rank,
        "alpha": adapter.config.alpha,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"Converted {len(args.files)} checkpoint(s) for {summary['concepts']} into {folder}")
    return 0
