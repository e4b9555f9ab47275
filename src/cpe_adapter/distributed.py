"""Training many concepts on several processes (``accelerate launch`` or any torch.distributed job).

Concept ``i`` is trained by process ``i % N``; its seed is derived from ``(seed, i, name)`` only
and its prompts are encoded by calls that depend only on that concept (see
:mod:`cpe_adapter.training_data`), so every concept's weights are the same whichever process trains
it. The processes then exchange their results (safetensors bytes and JSON, no pickled tensors)
and each assembles the same adapter, bit-identical to a one-process :func:`train_cpe` run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from safetensors.torch import load, save

from .adapter import CPEAdapter
from .config import ConceptSpec
from .training import Callback, ConceptResult, assemble, train_concepts

__all__ = ["process_layout", "train_many"]


def process_layout() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` outside a distributed launch.

    Under ``accelerate launch`` (``WORLD_SIZE`` > 1) the process group is created through
    accelerate's ``PartialState`` (gloo on CPU, NCCL on GPUs) if it does not exist yet.
    """
    dist = torch.distributed
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _pack(index: int, result: ConceptResult) -> tuple[int, bytes, str]:
    meta = {
        "spec": result.spec.__dict__,
        "seed": result.seed,
        "history": result.history,
        "final_loss": result.final_loss,
        "variants": result.variants,
    }
    return index, save({k: v.contiguous() for k, v in result.tensors.items()}), json.dumps(meta)


def _unpack(packed: tuple[int, bytes, str]) -> tuple[int, ConceptResult]:
    index, blob, text = packed
    meta = json.loads(text)
    spec = ConceptSpec.from_dict(meta["spec"])
    variants = list(meta.get("variants", []))
    return index, ConceptResult(spec, int(meta["seed"]), load(blob), meta["history"], meta["final_loss"], variants)


def train_many(
    pipe: Any,
    concepts: str | ConceptSpec | Sequence[str | ConceptSpec],
    *,
    preset: str = "names",
    anchors: Sequence[str] | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: Any = None,
    progress: bool = True,
    callback: Callback | None = None,
    **overrides: Any,
) -> CPEAdapter:
    """Train ``concepts`` sharded over the processes of a distributed launch; every process returns
    the merged adapter (concepts in the given order).

    Arguments are those of :func:`cpe_adapter.training.train_cpe` (checkpointing aside). Run it as
    ``accelerate launch --num_processes N [--cpu] script.py``; in a plain process it trains
    everything itself, with identical results.
    """
    rank, world = process_layout()
    context, specs, results, name = train_concepts(
        pipe,
        concepts,
        preset=preset,
        anchors=anchors,
        steps=steps,
        seed=seed,
        device=device,
        shard=(rank, world),
        progress=progress,
        callback=callback,
        **overrides,
    )
    mine = list(range(rank, len(specs), world))
    packed = [_pack(i, r) for i, r in zip(mine, results, strict=True)]
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, packed)
        packed = [item for part in gathered for item in part]
    by_index = dict(_unpack(p) for p in packed)
    if sorted(by_index) != list(range(len(specs))):
        missing = sorted(set(range(len(specs))) - set(by_index))
        raise RuntimeError(f"Concepts {missing} were not trained by any process; the launch lost a worker.")
    return assemble(context, [by_index[i] for i in range(len(specs))], seed, steps, name)
