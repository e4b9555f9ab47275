"""Stage checkpoints of a training run, and the signature that ties a checkpoint to its run.

A run with ``checkpoint_dir`` writes, at the end of every stage, each concept's parameters,
adversary and RNG state; ``resume_from`` continues it bit for bit. A checkpoint is refused when
the run differs (pipeline fingerprint, base model, concepts, plan, seed, layers), when it was written by
another format version, and when its files are missing or corrupt. Only safetensors and JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save

from .config import ConceptSpec
from .errors import CPEAdapterError
from .serialization import atomic_write_bytes, load_weights

if TYPE_CHECKING:
    from .losses import ProjectionStack
    from .training import TrainingContext

__all__ = ["CHECKPOINT_STATE", "Checkpointer", "open_checkpoint", "pipeline_fingerprint", "run_signature"]

CHECKPOINT_STATE = "trainer_state.json"
CHECKPOINT_FORMAT = "cpe-adapter-training-checkpoint"
CHECKPOINT_VERSION = 2


class Checkpointer:
    """Stage checkpoints: ``trainer_state.json`` plus one ``concept_XXXX_stage_YYY.safetensors`` per concept.

    Each concept file holds its parameters, the current adversary ``delta`` (if any) and its RNG
    state (``rng_state``, uint8) — with a fresh optimizer per stage, that is all a run needs to
    continue bit-exactly. The JSON holds the run's signature (refused on resume if it differs),
    and per concept the next stage to run, the tensor file of that stage, whether it is done, its
    history and final losses. Files are written atomically, each stage's tensors to a file of their
    own before the JSON that names them, and the previous stage's file is removed only after: a
    crash at any point leaves a JSON and tensors of the same stage. No pickle anywhere.
    """

    def __init__(self, directory: str | os.PathLike, signature: dict[str, Any], parameters: Sequence[str]) -> None:
        self.directory = Path(directory)
        self.signature = json.loads(json.dumps(signature))
        self.parameters = tuple(parameters)  # the tensors every concept file must hold, besides rng_state
        self.concepts: dict[str, dict[str, Any]] = {}

    @staticmethod
    def tensor_file(index: int, stage: int) -> str:
        return f"concept_{index:04d}_stage_{stage:03d}.safetensors"

    def load(self) -> None:
        """Read an existing checkpoint of the same run (a clear error if it is another run's)."""
        path = self.directory / CHECKPOINT_STATE
        if not path.is_file():
            raise CPEAdapterError(f"No training checkpoint in {self.directory} ({CHECKPOINT_STATE} is missing).")
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CPEAdapterError(f"{path} is not a readable checkpoint ({err}); start a fresh run.") from err
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CPEAdapterError(f"{path} is not a cpe-adapter training checkpoint.")
        if state.get("version") != CHECKPOINT_VERSION:
            raise CPEAdapterError(
                f"{path} was written by another version of cpe-adapter (checkpoint format {state.get('version')!r}, "
                f"this one reads {CHECKPOINT_VERSION}); it cannot be resumed: start a fresh run."
            )
        theirs = state.get("run", {})
        differing = sorted(k for k in set(theirs) | set(self.signature) if theirs.get(k) != self.signature.get(k))
        if differing:
            raise CPEAdapterError(
                f"The checkpoint in {self.directory} belongs to another training run (different {differing}); "
                "resume with the same pipeline, concepts, preset, steps, seed and options, or start afresh."
            )
        concepts = state.get("concepts", {})
        stages = int(self.signature["plan"]["stages"])
        for key, entry in concepts.items() if isinstance(concepts, dict) else [(None, None)]:
            stage = entry.get("next_stage") if isinstance(entry, dict) else None
            if not (isinstance(stage, int) and 1 <= stage <= stages and isinstance(entry.get("file"), str)):
                raise CPEAdapterError(f"{path} is corrupt (concept {key}: {entry!r:.80}); start a fresh run.")
        self.concepts = concepts

    def entry(self, index: int) -> dict[str, Any] | None:
        return self.concepts.get(str(index))

    def tensors(self, index: int) -> dict[str, torch.Tensor]:
        path = self.directory / self.concepts[str(index)]["file"]
        if not path.is_file():
            raise CPEAdapterError(f"{path} is missing; the checkpoint in {self.directory} is incomplete.")
        tensors = load_weights(path)
        missing = [k for k in (*self.parameters, "rng_state") if k not in tensors]
        if missing:
            raise CPEAdapterError(f"{path} lacks {missing}; the checkpoint is corrupt, start a fresh run.")
        floats = {k: v for k, v in tensors.items() if k != "rng_state"}
        if tensors["rng_state"].dtype != torch.uint8 or any(
            v.dtype != torch.float32 or not bool(torch.isfinite(v).all()) for v in floats.values()
        ):
            raise CPEAdapterError(f"{path} holds tensors of the wrong type or non-finite values; start a fresh run.")
        return tensors

    def save(self, index: int, tensors: dict[str, torch.Tensor], entry: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = self.tensor_file(index, int(entry["next_stage"]))
        previous = (self.concepts.get(str(index)) or {}).get("file")
        atomic_write_bytes(self.directory / name, save(tensors))
        self.concepts[str(index)] = json.loads(json.dumps({**entry, "file": name}))
        state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "run": self.signature}
        state["concepts"] = self.concepts
        atomic_write_bytes(self.directory / CHECKPOINT_STATE, (json.dumps(state, indent=1) + "\n").encode("utf-8"))
        if previous is not None and previous != name:
            (self.directory / previous).unlink(missing_ok=True)


def pipeline_fingerprint(pipe: Any, stack: ProjectionStack) -> str:
    """A short hash of what training reads from the pipeline: the frozen projections and their
    layer weights, and per text encoder its class, dtype, size and final parameters (a fine-tune
    changes them). Resuming on a pipeline with another fingerprint is refused, whatever its name."""
    from .training_data import text_encoders_of

    digest = hashlib.sha256()
    tensors = [stack.weight, stack.layer_weight]
    for encoder in text_encoders_of(pipe):
        params = list(encoder.parameters())
        digest.update(f"{type(encoder).__name__}/{params[0].dtype}/{sum(p.numel() for p in params)}".encode())
        tensors += params[-2:]
    for tensor in tensors:
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def run_signature(context: TrainingContext, specs: list[ConceptSpec], seed: int) -> dict[str, Any]:
    """What makes two runs the same run (JSON-ready): a checkpoint resumes only with an equal signature."""
    return {
        "concepts": [s.__dict__ for s in specs],
        "seed": int(seed),
        "plan": context.plan.to_dict(),
        "layers": [t.__dict__ for t in context.layers],
        "base_model": context.base_model,
        "pipeline": context.fingerprint,
    }


def open_checkpoint(
    checkpoint_dir: str | os.PathLike | None,
    resume_from: str | os.PathLike | None,
    signature: dict[str, Any],
    parameters: Sequence[str],
) -> Checkpointer | None:
    """The checkpoint a run writes to (``None`` without either folder), loaded from ``resume_from``.

    A new run never writes over an existing checkpoint, and a resumed run never writes into a
    folder that holds another checkpoint. Resuming into another (empty) folder copies the source's
    state concept by concept, so the new state never names a file that is not there yet.
    """
    if checkpoint_dir is None and resume_from is None:
        return None
    into_other = resume_from is not None and checkpoint_dir is not None
    into_other = into_other and Path(resume_from).resolve() != Path(checkpoint_dir).resolve()
    if checkpoint_dir is not None and (Path(checkpoint_dir) / CHECKPOINT_STATE).is_file():
        if resume_from is None:
            raise CPEAdapterError(
                f"{checkpoint_dir} already holds the checkpoint of a training run; pass "
                f"resume_from={str(checkpoint_dir)!r} to finish it, or another (empty) checkpoint_dir to start afresh."
            )
        if into_other:
            raise CPEAdapterError(
                f"checkpoint_dir {checkpoint_dir} already holds the checkpoint of another run; resume from "
                f"{resume_from} into an empty folder (or into {resume_from} itself)."
            )
    checkpoint = Checkpointer(checkpoint_dir if checkpoint_dir is not None else resume_from, signature, parameters)
    if resume_from is not None:
        source = Checkpointer(resume_from, checkpoint.signature, parameters)
        source.load()
        if into_other:
            for key in source.concepts:
                checkpoint.save(int(key), source.tensors(int(key)), source.concepts[key])
        else:
            checkpoint.concepts = source.concepts
    return checkpoint
