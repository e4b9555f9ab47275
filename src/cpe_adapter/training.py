"""Training CPE erasers (docs/training.md): no UNet forward, no images, only text embeddings.

Every prompt is encoded once with the pipeline's own text encoder (:mod:`training_data`); the
losses then run on the frozen cross-attention ``to_k``/``to_v`` weights alone. Training is a
sequence of *stages*: stage ``s`` trains the ResAG on ``L_erase + lambda_adv L_adv +
lambda_anc L_anchor`` against the adversary of the previous stage (none in stage 0); then a fresh
set of embedding perturbations ``Delta`` is trained, with the ResAG frozen, to make the erased
projections of ``E_t + Delta`` match the original projections of ``E_t`` (an attack), and the next
stage trains against it.

The loss math lives in :mod:`losses`, the resolved hyper-parameters in :mod:`training_plan` and
the stage checkpoints in :mod:`checkpoints`; this module runs the stages.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from .adapter import CPEAdapter, base_model_info
from .checkpoints import Checkpointer, open_checkpoint, pipeline_fingerprint, run_signature
from .config import ConceptSpec, CPEConfig, TargetLayer
from .errors import CPEAdapterError
from .losses import (
    ProjectionStack,
    base_energy,
    build_stack,
    codes_from_projection,
    coupling,
    cross_term,
    gate_matrix,
    residual_energy,
)
from .recipes import augment_targets
from .targets import denoiser_of, find_target_layers
from .training_data import PromptSet, build_prompt_set
from .training_plan import (
    ANCHOR_NOISE,
    WEIGHT_DECAY,
    TrainingPlan,
    concept_seed,
    concept_specs,
    resolve_plan,
    with_paraphrases,
)

__all__ = ["ConceptResult", "ConceptRun", "TrainingContext", "make_context", "train_concepts", "train_cpe"]

DELTA_INIT = 1e-3  # initial adversary, relative to the target embeddings' RMS
# Intra-op threads on a CPU. An erase step's products are too small to gain from a second thread,
# which draws the next step's batch instead (``ConceptRun._batches``); the attack's gain from two.
ERASE_THREADS_CPU = 1
ATTACK_THREADS_CPU = 2
STACK_THREADS_CPU = 2  # the projection stack (Gram matrix, eigenvectors, c_l) is built with this many
# Prompts found by the discrete searches that stay adversarial rows (the latest ones).
MAX_FOUND_PROMPTS = 16
EVAL_TEMPLATES = 8
EVAL_ANCHORS = 32


@contextlib.contextmanager
def _threads(count: int | None):
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ============================================================================ one concept's run
Callback = Callable[[int, int, dict[str, Any]], Any]


@dataclass
class ConceptResult:
    """Trained tensors of one concept (CPU, adapter layout with a concept axis of 1) and its logs."""

    spec: ConceptSpec
    seed: int
    tensors: dict[str, torch.Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)
    final_loss: dict[str, float] = field(default_factory=dict)
    variants: list[str] = field(default_factory=list)  # generated target variants (recipes other than "paper")


def _cosine_lr(base: float, step: int, total: int, warmup: int) -> float:
    warmup = min(warmup, total // 4)
    if step < warmup:
        return base * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def _spread(count: int, keep: int) -> list[int]:
    if count <= keep:
        return list(range(count))
    return sorted({round(i * (count - 1) / (keep - 1)) for i in range(keep)}) if keep > 1 else [0]


def _fast_adamw(device: torch.device) -> dict[str, bool]:
    """Fused AdamW (one kernel for all parameters) where torch has it: most of a small step's cost is
    per-operation overhead."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


def _fresh(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy in newly allocated memory: tensors read from a file may sit at any alignment, and
    matrix kernels may round differently for a different alignment, which would break bit-exact
    resumption."""
    return tensor.to(device, torch.float32, copy=True).contiguous()


class ConceptRun:
    """State and loops of one concept's training: parameters, adversary, RNG and history."""

    PARAMS = ("gate_a", "gate_b", "gate_v", "down", "up")

    def __init__(
        self,
        stack: ProjectionStack,
        data: PromptSet,
        spec: ConceptSpec,
        plan: TrainingPlan,
        seed: int,
        device: Any,
        target_weights: torch.Tensor | None = None,
        concept_rows: int | None = None,
    ) -> None:
        self.stack, self.spec, self.plan, self.device = stack, spec, plan, torch.device(device)
        preset = plan.preset
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        d, m, r, layers = stack.dim, preset.gate_rank, preset.residual_rank, stack.num_layers
        self.scale = preset.alpha / r
        gen, dev = self.generator, self.device
        bound = 1.0 / math.sqrt(d)
        self.params = {
            "gate_a": torch.empty(d, m, device=dev).normal_(0.0, 1e-8, generator=gen),
            "gate_b": torch.empty(d, m, device=dev).normal_(0.0, 1e-8, generator=gen),
            "gate_v": torch.zeros(d, device=dev),
            "down": torch.empty(d, layers * r, device=dev).uniform_(-bound, bound, generator=gen),
            "up": torch.zeros(r, stack.weight.shape[0], device=dev),
        }
        self.target = data.target.to(dev, torch.float32)
        # Sampling probabilities of the target rows (a widened target set, :mod:`recipes`); None: uniform.
        # The concept's own rows come first; stages before ``recipe.widen_from_stage`` draw only those.
        self.target_weights = None if target_weights is None else target_weights.to(dev, torch.float32)
        self.concept_rows = len(data.templates) if target_weights is None else int(concept_rows)
        self._stage_weights: torch.Tensor | None = None
        self.neutral = data.neutral.to(dev, torch.float32)
        if self.target.shape[-1] != d:
            raise CPEAdapterError(
                f"The text encoder gives {self.target.shape[-1]}-d embeddings but the UNet's cross-attention reads "
                f"{d}-d; this pipeline's components do not fit together."
            )
        self.tokens = self.target.shape[1]
        self.offset = (1.0 + spec.eta) * (self.target - self.neutral)
        with torch.no_grad():
            self.offset_energy = base_energy(self.offset, stack.gram)
        small = data.anchors.dtype == torch.float32 or dev.type != "cpu"
        self.anchors = data.anchors.to(dev, torch.float32) if small else data.anchors
        self.empty = data.empty.to(dev, torch.float32)
        self.delta: torch.Tensor | None = None
        # ``[rows, P]``: the adversarial errors' residual-free part ``2 <u, Delta G> + Delta G Delta^T``
        # (per token) for every target row; fixed during an erase phase, so computed once per phase.
        self._adv_base: torch.Tensor | None = None
        # Prompts found by the discrete search (``prompt_searches``): their embeddings ``[k, T, d]`` (what
        # the gate reads) and offsets ``x - goal`` from the erase goal ``E_t - u`` of the row each
        # search started from (a projection of ``goal`` is that row's erase target, P being affine).
        self.found: torch.Tensor | None = None
        self.found_offsets: torch.Tensor | None = None
        self._found_energy: torch.Tensor | None = None
        self.history: list[dict[str, Any]] = []
        self.next_stage = 0
        self.eval_templates = torch.tensor(_spread(self.target.shape[0], EVAL_TEMPLATES), device=dev)
        self.eval_anchors = torch.tensor(_spread(self.anchors.shape[0], EVAL_ANCHORS), device=self.anchors.device)

    # ------------------------------------------------------------------------------ helpers
    def _phase_threads(self, cpu_default: int) -> int | None:
        """Intra-op threads of a loop: ``cpu_default`` on a CPU unless ``num_threads`` is set. A fixed
        number, not the machine's, so a run gives the same bits in any process."""
        return cpu_default if self.device.type == "cpu" and self.plan.num_threads is None else None

    def _trainable(self) -> list[str]:
        return [k for k in self.PARAMS if not (k == "gate_b" and self.plan.tie_gate_qk)]

    def _matrix(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        gate_b = None if self.plan.tie_gate_qk else params["gate_b"]
        return gate_matrix(params["gate_a"], gate_b, params["gate_v"], params["down"])

    def _from_projection(self, proj: torch.Tensor) -> torch.Tensor:
        preset = self.plan.preset
        width = preset.residual_rank * self.stack.num_layers
        return codes_from_projection(proj, preset.gate_rank, self.plan.tie_gate_qk, self.scale, width)[0]

    def _codes(self, embeds: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._from_projection(embeds @ self._matrix(params))

    def _randint(self, high: int, size: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(high, size, generator=self.generator, device=self.device)

    def _draw_target(self) -> int:
        """Index of the target row of one step: uniform over the concept's rows (the paper), or by
        ``target_weights`` over the widened set once the recipe widens it."""
        if self._stage_weights is None:
            return int(self._randint(self.concept_rows, (1,)))
        return int(torch.multinomial(self._stage_weights, 1, generator=self.generator))

    def _set_stage(self, stage: int) -> None:
        widened = self.target_weights is not None and stage >= self.plan.recipe.widen_from_stage
        self._stage_weights = self.target_weights if widened else None

    def _sample_anchors(self, out: torch.Tensor, noise: torch.Tensor) -> None:
        """Fill ``out`` ``[S, T, d]`` with mixup anchors ``lam a + (1 - lam) b`` (``lam ~ U(0, 1)``) plus
        Gaussian noise whose per-element std is ``ANCHOR_NOISE`` x the token's norm / sqrt(d), so the
        noise is about ``ANCHOR_NOISE`` times each token's norm. ``noise`` is scratch space."""
        count = out.shape[0]
        pairs = self._randint(self.anchors.shape[0], (2, count)).to(self.anchors.device)
        lam = torch.rand(count, 1, 1, generator=self.generator, device=self.device)
        first = self.anchors[pairs[0]].to(self.device, torch.float32)
        second = self.anchors[pairs[1]].to(self.device, torch.float32)
        torch.lerp(second, first, lam, out=out)
        torch.randn(noise.shape, generator=self.generator, device=self.device, out=noise)
        sigma = out.norm(dim=-1, keepdim=True).mul_(ANCHOR_NOISE / math.sqrt(out.shape[-1]))
        out.addcmul_(noise, sigma)

    # ----------------------------------------------------------------------------- the losses
    def _erase_step_losses(
        self, params: dict[str, torch.Tensor], template: int, batch: torch.Tensor, labelled: int
    ) -> dict[str, torch.Tensor]:
        """``erase``, ``anchor``, ``adv`` (with an adversary) and ``found`` (with found prompts) losses;
        ``batch`` holds ``E_t``, then ``E_t + Delta_i`` and the found prompts (the ``labelled`` rows),
        then the anchors (``""`` and the mixups). ``adv`` and ``found`` have the same weight."""
        offset = self.offset[template]
        codes = self._codes(batch, params)
        m, q = coupling(self.stack, params["up"])
        energy = residual_energy(codes, q)
        offset_m = offset @ m
        rows_m, rows_base = [offset_m.unsqueeze(0)], [self.offset_energy[template : template + 1]]
        if self.delta is not None:
            rows_m.append(offset_m + self.delta @ m)
            rows_base.append(self.offset_energy[template] + self._adv_base[template])
        if self.found is not None:
            rows_m.append(self.found_offsets @ m)
            rows_base.append(self._found_energy)
        offsets_m = torch.cat(rows_m) if len(rows_m) > 1 else rows_m[0]
        cross = 2.0 * (codes[:labelled] * offsets_m).sum((-1, -2)) / self.tokens
        errors = torch.cat(rows_base) + cross + energy[:labelled]
        losses = {"erase": errors[0], "anchor": energy[labelled:].mean()}
        first_found = 1 + (0 if self.delta is None else self.delta.shape[0])
        if first_found > 1:
            losses["adv"] = errors[1:first_found].mean()
        if self.found is not None:
            losses["found"] = errors[first_found:].mean()
        return losses

    @torch.no_grad()
    def attack_objective(self, embeds: torch.Tensor, row: int) -> torch.Tensor:
        """``||P'(x) - P(E_t)||²_w`` (token mean) of embeddings ``[n, T, d]`` against target row ``row``:
        what a prompt attack on the current eraser minimises (``P`` affine: ``u = x - E_t``)."""
        m, q = coupling(self.stack, self.params["up"])
        codes = self._codes(embeds, self.params)
        offsets = embeds - self.target[row]
        return base_energy(offsets, self.stack.gram) + cross_term(codes, offsets, m) + residual_energy(codes, q)

    def add_found(self, embeds: torch.Tensor, rows: Sequence[int]) -> None:
        """Make prompts found by a search (``[k, T, d]``, started from target rows ``rows``) adversarial
        rows of every later erase phase, keeping the latest ``MAX_FOUND_PROMPTS``."""
        index = torch.tensor(list(rows), device=self.device)
        embeds = embeds.to(self.device, torch.float32)
        offsets = embeds - (self.target[index] - self.offset[index])
        if self.found is not None:
            embeds, offsets = torch.cat([self.found, embeds]), torch.cat([self.found_offsets, offsets])
        self.found, self.found_offsets = embeds[-MAX_FOUND_PROMPTS:], offsets[-MAX_FOUND_PROMPTS:]

    @torch.no_grad()
    def _adversary_energies(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual-free parts of the current adversary's errors: ``[rows, P]`` for the adversarial
        loss (``(u + Delta) G (u + Delta)^T - u G u^T``, per token, for every target row's ``u``) and
        ``[P]`` for the attack's (``Delta G Delta^T``)."""
        delta_gram = self.delta @ self.stack.gram
        energy = (self.delta * delta_gram).sum((-1, -2)) / self.tokens
        cross = 2.0 * torch.einsum("ptd,ntd->np", delta_gram, self.offset) / self.tokens
        return cross + energy, energy

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Losses on a fixed spread of templates and anchors (for logs and tests; no RNG used)."""
        params, stack = self.params, self.stack
        m, q = coupling(stack, params["up"])
        idx = self.eval_templates
        codes = self._codes(self.target[idx], params)
        erase = (self.offset_energy[idx] + cross_term(codes, self.offset[idx], m) + residual_energy(codes, q)).mean()
        anchors = self.anchors[self.eval_anchors].to(self.device, torch.float32)
        anchor = residual_energy(self._codes(torch.cat([self.empty.unsqueeze(0), anchors]), params), q).mean()
        out = {"erase": float(erase), "anchor": float(anchor)}
        if self.delta is not None:
            delta = self.delta
            adv_base, attack_base = self._adversary_energies()
            adv, attack = [], []
            for j in idx.tolist():
                codes = self._codes(self.target[j] + delta, params)
                energy = residual_energy(codes, q)
                adv_row = self.offset_energy[j] + adv_base[j] + cross_term(codes, self.offset[j] + delta, m)
                adv.append(adv_row + energy)
                attack.append(attack_base + cross_term(codes, delta, m) + energy)
            out["adv"] = float(torch.cat(adv).mean())
            out["attack"] = float(torch.cat(attack).mean())
        return out

    # ------------------------------------------------------------------------------- the loops
    def erase_phase(self, stage: int, report: Callable[[str, int, int, dict[str, Any]], None]) -> None:
        """Train the ResAG on ``L_erase + lambda_adv L_adv + lambda_anc L_anchor`` (adversary frozen)."""
        preset, plan = self.plan.preset, self.plan
        iters = plan.erase_iters[stage]
        self._set_stage(stage)
        base_lr = preset.first_stage_lr if stage == 0 else preset.lr
        names = self._trainable()
        leaves = {k: self.params[k].clone().requires_grad_(k in names) for k in self.PARAMS}
        optimizer = torch.optim.AdamW(
            [leaves[k] for k in names], lr=base_lr, weight_decay=WEIGHT_DECAY, **_fast_adamw(self.device)
        )
        adversaries = 0 if self.delta is None else self.delta.shape[0]
        if self.delta is not None:
            self._adv_base = self._adversary_energies()[0]
        if self.found is not None:
            self._found_energy = base_energy(self.found_offsets, self.stack.gram)
        found = 0 if self.found is None else self.found.shape[0]
        adv_weight = preset.adversarial_weight if adversaries + found else 0.0
        labelled = 1 + adversaries + found
        with _threads(self._phase_threads(ERASE_THREADS_CPU)):
            for step, (template, batch) in enumerate(self._batches(iters, labelled)):
                lr = _cosine_lr(base_lr, step, iters, plan.warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                losses = self._erase_step_losses(leaves, template, batch, labelled)
                total = losses["erase"] + preset.anchor_weight * losses["anchor"]
                for key in ("adv", "found"):
                    if key in losses:
                        total = total + adv_weight * losses[key]
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                if (step + 1) % plan.log_every == 0 or step + 1 == iters:
                    logs = {k: float(v.detach()) for k, v in losses.items()}
                    report("erase", step + 1, iters, {**logs, "loss": float(total.detach()), "lr": lr})
        self.params = {k: v.detach() for k, v in leaves.items()}

    def _batches(self, iters: int, labelled: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Each erase step's target row and batch (``E_t``, ``E_t + Delta_i``, ``""``, mixups).

        Two buffers are refilled in place. On a CPU a worker thread fills the next step's buffer
        while the caller trains on the current one; the random draws happen in the same order
        either way, so the result does not depend on it.
        """
        shape = (labelled + 1 + self.plan.preset.anchor_samples, *self.target.shape[1:])
        buffers = [torch.empty(shape, device=self.device) for _ in range(2)]
        adversaries = 0 if self.delta is None else self.delta.shape[0]
        for buffer in buffers:
            buffer[labelled].copy_(self.empty)
            if self.found is not None:
                buffer[1 + adversaries : labelled].copy_(self.found)
        noises = [torch.empty_like(buffer[labelled + 1 :]) for buffer in buffers]

        def fill(step: int) -> int:
            batch, noise = buffers[step % 2], noises[step % 2]
            template = self._draw_target()
            batch[0].copy_(self.target[template])
            if self.delta is not None:
                torch.add(self.target[template], self.delta, out=batch[1 : 1 + adversaries])
            self._sample_anchors(batch[labelled + 1 :], noise)
            return template

        if self.device.type != "cpu":
            for step in range(iters):
                yield fill(step), buffers[step % 2]
            return
        with ThreadPoolExecutor(1) as worker:
            pending = worker.submit(fill, 0)
            for step in range(iters):
                template = pending.result()
                if step + 1 < iters:
                    pending = worker.submit(fill, step + 1)
                yield template, buffers[step % 2]

    def attack_phase(self, stage: int, report: Callable[[str, int, int, dict[str, Any]], None]) -> dict[str, float]:
        """Train a fresh adversary against the frozen ResAG; returns the evaluation before it moved.

        The objective is ``mean_i ||P'(E_t + Delta_i) - P(E_t)||²_w``. ``Delta`` is optimised in the
        eigenbasis of ``G`` (``Delta = Z V^T``, an orthogonal change of coordinates: the same set of
        perturbations and the same objective), where ``Delta G Delta^T = sum Z² lambda`` is
        elementwise and the gate reads ``(E_t + Delta) [A|B|D|v] = E_t [..] + Z (V^T [..])`` — no
        ``d x d`` product per step.
        """
        preset, plan, stack = self.plan.preset, self.plan, self.stack
        iters = plan.attack_iters
        self._set_stage(stage)
        rms = self.target.pow(2).mean().sqrt()
        shape = (preset.adversaries, *self.target.shape[1:])
        # An isotropic Gaussian is the same distribution in any orthonormal basis.
        z = torch.randn(shape, generator=self.generator, device=self.device) * (DELTA_INIT * rms)
        vectors, values = stack.eigenvectors, stack.eigenvalues
        self.delta = z @ vectors.T
        start = self.evaluate()
        params = self.params
        with torch.no_grad():
            matrix = self._matrix(params)
            m, q = coupling(stack, params["up"])
            width = matrix.shape[1]
            target_proj = self.target @ matrix  # [n_templates, T, k]
            both_v = vectors.T @ torch.cat([matrix, m], dim=1)  # [d, k + L r]: the gate's and M's columns
        z = z.clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([z], lr=preset.attack_lr, weight_decay=0.0, **_fast_adamw(self.device))
        with _threads(self._phase_threads(ATTACK_THREADS_CPU)):
            for step in range(iters):
                template = self._draw_target()
                read = z @ both_v
                codes = self._from_projection(target_proj[template] + read[..., :width])
                base = base_energy(z, values)
                cross = 2.0 * (codes * read[..., width:]).sum((-1, -2)) / self.tokens
                loss = (base + cross + residual_energy(codes, q)).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if (step + 1) % plan.log_every == 0 or step + 1 == iters:
                    value = float(loss.detach())
                    report("attack", step + 1, iters, {"attack": value, "loss": value, "lr": preset.attack_lr})
        self.delta = z.detach() @ vectors.T
        return start

    def run_stage(self, stage: int, report: Callable[[str, int, int, dict[str, Any]], None]) -> dict[str, Any]:
        """Erase phase of ``stage`` and, unless it is the last, the attack that the next stage faces."""
        record: dict[str, Any] = {"stage": stage, "erase_iters": self.plan.erase_iters[stage]}
        record["before"] = self.evaluate()
        self.erase_phase(stage, report)
        record["after_erase"] = self.evaluate()
        if stage + 1 < self.plan.stages and self.plan.preset.adversaries > 0:
            record["attack_iters"] = self.plan.attack_iters
            record["attack_start"] = self.attack_phase(stage, report)
            record["after_attack"] = self.evaluate()
        self.history.append(record)
        self.next_stage = stage + 1
        return record

    # ------------------------------------------------------------------------------ state I/O
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.params.items()}
        if self.delta is not None:
            tensors["delta"] = self.delta.cpu().contiguous()
        if self.found is not None:
            tensors["found"] = self.found.cpu().contiguous()
            tensors["found_offsets"] = self.found_offsets.cpu().contiguous()
        tensors["rng_state"] = self.generator.get_state().cpu()
        return tensors

    def load_state(self, tensors: dict[str, torch.Tensor], history: list[dict[str, Any]], next_stage: int) -> None:
        for key in self.PARAMS:
            if tuple(tensors[key].shape) != tuple(self.params[key].shape):
                raise CPEAdapterError(f"Checkpoint tensor {key!r} has shape {list(tensors[key].shape)}; it is corrupt.")
            self.params[key] = _fresh(tensors[key], self.device)
        self.delta = _fresh(tensors["delta"], self.device) if "delta" in tensors else None
        self.found = _fresh(tensors["found"], self.device) if "found" in tensors else None
        self.found_offsets = _fresh(tensors["found_offsets"], self.device) if "found_offsets" in tensors else None
        self.generator.set_state(tensors["rng_state"])
        self.history = list(history)
        self.next_stage = next_stage

    def result(self, seed: int) -> ConceptResult:
        final = self.evaluate()
        final["erase_initial"] = self.history[0]["before"]["erase"] if self.history else final["erase"]
        tensors = {k: v.detach().cpu().unsqueeze(0).contiguous() for k, v in self.params.items()}
        return ConceptResult(self.spec, seed, tensors, list(self.history), final)


# ============================================================================= whole runs
@dataclass
class TrainingContext:
    """What every concept of one pipeline shares: the plan, layers and frozen projection stack."""

    pipe: Any
    plan: TrainingPlan
    layers: list[TargetLayer]
    stack: ProjectionStack
    device: torch.device
    domain: str
    base_model: str | None
    base_model_revision: str | None
    fingerprint: str = ""
    erased: tuple[str, ...] = ()


def checked_device(device: Any, label: str = "device") -> torch.device:
    """``device`` as a ``torch.device``, refused clearly when torch does not know it or lacks it.

    ``label`` names the argument in the messages (``"--device"`` for the command line).
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise CPEAdapterError(f"{label} {device!r}: unknown device ({err}).") from err
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if device.type not in ("cpu", "meta") and not (available is not None and available()):
        raise CPEAdapterError(f"{label} {str(device)!r}: no {device.type} device is available here; use 'cpu'.")
    return device


def make_context(pipe: Any, plan: TrainingPlan, device: Any = None) -> TrainingContext:
    denoiser = denoiser_of(pipe)
    layers = find_target_layers(denoiser)
    if device is None:
        device = next(denoiser.parameters()).device
    device = checked_device(device)
    tokens = _sequence_length(pipe)
    # A fixed thread count: the eigen-decomposition and spectral norms differ in their last bits
    # with the count, and a seed must give the same adapter in every process.
    with _threads(STACK_THREADS_CPU if device.type == "cpu" else None):
        stack = build_stack(denoiser, layers, tokens, device)
    context = TrainingContext(pipe, plan, layers, stack, device, plan.preset.name, *base_model_info(pipe, denoiser))
    context.fingerprint = pipeline_fingerprint(pipe, stack)
    return context


def _sequence_length(pipe: Any) -> int:
    from .training_data import tokenizers_of

    return int(tokenizers_of(pipe)[0].model_max_length)


def train_one(
    context: TrainingContext,
    spec: ConceptSpec,
    index: int,
    seed: int,
    *,
    progress: bool = True,
    callback: Callback | None = None,
    checkpoint: Checkpointer | None = None,
) -> ConceptResult:
    """Train concept number ``index`` (its seed derived from ``seed``), resuming from ``checkpoint``."""
    own_seed = concept_seed(seed, index, spec.name)
    entry = checkpoint.entry(index) if checkpoint is not None else None
    if entry is not None and entry.get("done"):
        tensors = checkpoint.tensors(index)
        kept = {k: tensors[k].unsqueeze(0) for k in ConceptRun.PARAMS}
        return ConceptResult(
            spec, own_seed, kept, entry.get("history", []), entry.get("final_loss", {}), entry.get("variants", [])
        )
    plan = context.plan
    data = build_prompt_set(
        context.pipe,
        spec.name,
        spec.neutral,
        context.domain,
        templates=plan.templates,
        anchors=plan.anchors,
        similar=plan.preset.similar_anchors,
        anchor_templates=plan.preset.anchor_templates,
        erased=context.erased,
    )
    widened = augment_targets(context.pipe, data, spec.name, plan.recipe, domain=context.domain, seed=own_seed)
    run = ConceptRun(
        context.stack, widened.data, spec, plan, own_seed, context.device, widened.weights, len(data.templates)
    )
    if entry is not None:
        run.load_state(checkpoint.tensors(index), entry.get("history", []), int(entry["next_stage"]))
    result = None
    with _threads(plan.num_threads):
        for stage in range(run.next_stage, plan.stages):
            total = plan.erase_iters[stage] + (plan.attack_iters if stage + 1 < plan.stages else 0)
            bar = _progress_bar(progress, total, f"{spec.name} stage {stage + 1}/{plan.stages}")
            try:
                record = run.run_stage(stage, _reporter(bar, plan, spec.name, index, stage, callback))
            finally:
                if bar is not None:
                    bar.close()
            _check_diverged(run, spec.name, stage)
            if "attack_iters" in record and plan.preset.prompt_searches > 0:
                record["found_prompts"] = search_prompts(context.pipe, run, data, spec.name, stage, own_seed)
            done = stage + 1 == plan.stages
            result = run.result(own_seed) if done else None
            if checkpoint is not None:
                entry = {"next_stage": stage + 1, "done": done, "history": run.history, "variants": widened.variants}
                if result is not None:
                    entry["final_loss"] = result.final_loss
                checkpoint.save(index, run.state_tensors(), entry)
            if callback is not None:
                callback(
                    stage,
                    plan.erase_iters[stage],
                    {"concept": spec.name, "concept_index": index, "phase": "stage_end", **copy.deepcopy(record)},
                )
    result = result if result is not None else run.result(own_seed)
    result.variants = list(widened.variants)
    return result


def _check_diverged(run: ConceptRun, concept: str, stage: int) -> None:
    """Stop a run whose parameters or losses left the finite numbers: nothing after it can recover."""
    losses = run.history[-1].get("after_erase", {}) if run.history else {}
    broken = [k for k, v in run.params.items() if not bool(torch.isfinite(v).all())]
    broken += [f"{k} loss" for k, v in losses.items() if not math.isfinite(v)]
    if broken:
        raise CPEAdapterError(
            f"Training of {concept!r} diverged in stage {stage + 1} ({', '.join(broken)} not finite): the learning "
            "rates (lr, first_stage_lr) or eta are too large for this model. Nothing was saved from this stage."
        )


def search_prompts(
    pipe: Any, run: ConceptRun, data: PromptSet, concept: str, stage: int, seed: int
) -> list[dict[str, Any]]:
    """The discrete adversaries of one stage (``prompt_searches``): greedy token searches, each from
    one training prompt of the concept (different rows each stage), for a real prompt whose erased
    K/V come closest to that prompt's original K/V. Prompts that beat their start join the run's
    adversarial rows (:meth:`ConceptRun.add_found`); returns them with their template index.
    """
    from .attacks import coordinate_search
    from .training_data import encode_prompts, tokenizers_of

    preset = run.plan.preset
    tokenizer = tokenizers_of(pipe)[0]
    count = len(data.templates)
    rows = [(stage * preset.prompt_searches + i) % count for i in range(min(preset.prompt_searches, count))]
    found, found_rows = [], []
    for i, row in enumerate(rows):
        start = data.templates[row].replace("{}", concept)

        def score(texts: list[str], row: int = row) -> torch.Tensor:
            embeds = encode_prompts(pipe, texts, cache=False).to(run.device, torch.float32)
            return run.attack_objective(embeds, row).cpu()

        start_score = float(run.attack_objective(run.target[row : row + 1], row)[0])
        best, best_score, _, _ = coordinate_search(
            tokenizer,
            start,
            score,
            budget=preset.prompt_search_budget,
            seed=concept_seed(seed, stage, f"search-{i}"),
            start_score=start_score,
        )
        if best_score < start_score:
            found.append(best)
            found_rows.append(row)
    if found:
        run.add_found(encode_prompts(pipe, found, cache=False), found_rows)
    return [{"prompt": prompt, "template": row} for prompt, row in zip(found, found_rows, strict=True)]


def _reporter(
    bar: Any, plan: TrainingPlan, concept: str, index: int, stage: int, callback: Callback | None
) -> Callable[[str, int, int, dict[str, Any]], None]:
    """The ``report(phase, step, iters, logs)`` of one stage: advances ``bar`` and calls ``callback``."""

    def report(phase: str, step: int, iters: int, logs: dict[str, Any]) -> None:
        if bar is not None:
            bar.update(min(plan.log_every, step - (step - 1) // plan.log_every * plan.log_every))
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k != "lr"}, refresh=False)
        if callback is not None:
            callback(stage, step, {"concept": concept, "concept_index": index, "phase": phase, "iters": iters, **logs})

    return report


def _progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def assemble(
    context: TrainingContext, results: list[ConceptResult], seed: int, steps: int | None, name: str | None
) -> CPEAdapter:
    """Stack per-concept results (in order) into one adapter whose config records how it was trained."""
    plan = context.plan
    adapters = []
    for res in results:
        config = CPEConfig(
            concepts=[res.spec],
            text_embed_dim=context.stack.dim,
            target_layers=list(context.layers),
            gate_rank=plan.preset.gate_rank,
            residual_rank=plan.preset.residual_rank,
            alpha=plan.preset.alpha,
            tie_gate_qk=plan.tie_gate_qk,
            name=name,
            base_model=context.base_model,
            base_model_revision=context.base_model_revision,
            preset=plan.preset.name,
        )
        adapter = CPEAdapter(config, init=False)
        with torch.no_grad():
            for key in ConceptRun.PARAMS:
                param = getattr(adapter, key)
                param.copy_(res.tensors[key].reshape(param.shape))
        adapters.append(adapter)
    merged = CPEAdapter.concatenate(adapters, name=name)
    merged.config.training = {
        **plan.to_dict(),
        "seed": int(seed),
        "steps": steps,
        "concept_seeds": {r.spec.name: r.seed for r in results},
        "final_loss": {r.spec.name: r.final_loss for r in results},
        "history": {r.spec.name: r.history for r in results},
        "variants": {r.spec.name: r.variants for r in results},
    }
    return merged.to(context.device)


def train_concepts(
    pipe: Any,
    concepts: Any,
    *,
    preset: str = "names",
    anchors: Sequence[str] | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: Any = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    callback: Callback | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    **overrides: Any,
) -> tuple[TrainingContext, list[ConceptSpec], list[ConceptResult], str | None]:
    """Train ``concepts`` (with the user's paraphrases as concepts of their own, after them), or with
    ``shard=(rank, world)`` every ``world``-th of them from ``rank`` on; the building block of
    :func:`train_cpe` and :func:`cpe_adapter.distributed.train_many`."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise CPEAdapterError(f"`seed` must be an integer, got {seed!r}.")
    seed = int(seed)
    if callback is not None and not callable(callback):
        raise CPEAdapterError(f"`callback` must be callable as callback(stage, step, logs), got {callback!r:.80}.")
    plan, name = resolve_plan(preset, steps, anchors, overrides)
    specs = with_paraphrases(pipe, concept_specs(pipe, concepts, plan), plan)
    context = make_context(pipe, plan, device)
    context.erased = tuple(spec.name for spec in specs)
    signature = run_signature(context, specs, seed)
    checkpoint = open_checkpoint(checkpoint_dir, resume_from, signature, ConceptRun.PARAMS)
    rank, world = (0, 1) if shard is None else shard
    chosen = range(rank, len(specs), world)
    results = [
        train_one(context, specs[i], i, seed, progress=progress, callback=callback, checkpoint=checkpoint)
        for i in chosen
    ]
    return context, specs, results, name


def train_cpe(
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
    checkpoint_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    recipe: str | None = None,
    paraphrases: Mapping[str, Sequence[str]] | None = None,
    **overrides: Any,
) -> CPEAdapter:
    """Train a CPE eraser for one or more concepts on ``pipe``'s own text encoder and weights.

    Args:
        concepts: a concept string, a :class:`ConceptSpec`, or a list; several concepts are trained
            one after another (each with fresh parameters and its own neutral phrase and eta) and
            stacked on the concept axis.
        preset: ``"names"``, ``"styles"`` or ``"explicit"`` (the presets table of docs/training.md).
        anchors: concepts to preserve instead of the default anchors (the domain's general words and
            the ~50 pool concepts most similar to the target); each is filled into
            ``anchor_templates`` of the templates (8 by default; ``anchor_templates=None`` for
            every template), rotating from one anchor to the next (for ``"explicit"`` they are
            whole sentences).
        steps: total erase iterations; the stage schedule (attack iterations too) scales to it.
        seed: makes the run deterministic on a given device (a local generator; the global RNG is
            neither used nor changed). Concept ``i`` uses a seed derived from ``(seed, i, name)``.
        device: where to train (default: the UNet's device).
        progress: show a progress bar per stage with the loss figures.
        callback: ``callback(stage, step, logs)`` every ``log_every`` steps of each phase (``logs``:
            ``concept``, ``concept_index``, ``phase`` ("erase" or "attack"), ``iters``, ``loss``,
            ``lr`` and the loss terms ``erase``, ``anchor``, ``adv`` / ``attack``), and once at the
            end of every stage with ``phase="stage_end"`` and that stage's evaluation record.
        checkpoint_dir: write a checkpoint at the end of every stage here.
        resume_from: continue the run checkpointed in this folder; the result equals an
            uninterrupted run's bit for bit (same device).
        recipe: how the erase target set is built (:mod:`cpe_adapter.recipes`): ``"paper"`` (the
            default, also for ``None``) trains on the concept string alone, the paper's recipe;
            ``"spans"``, ``"region"``, ``"typos"`` and ``"nearest"`` also erase variants generated
            from the concept (sub-spans, spellings, nearest vocabulary tokens, points of its
            embedding region); none of them beat ``"paper"`` on held-out paraphrases (docs).
        paraphrases: ``{concept: [other ways to say it]}`` (the mapping ``evaluate`` takes): wordings
            no generator finds — descriptions ("the Dutch painter of sunflowers"), nicknames, the
            misspellings users type. Each becomes a concept of its own after the given ones (its
            own gate and residual, the concept's neutral phrase and eta), so the concepts
            themselves train exactly as without it; a paraphrase equal to a concept, or repeated,
            is skipped.
        **overrides: any preset hyper-parameter (``eta``, ``neutral``, ``anchor_weight``, ``lr``,
            ``anchor_templates``, ``prompt_searches``, ...) and ``tie_gate_qk``, ``name`` (adapter
            name), ``warmup_steps``, ``templates``, ``log_every``, ``num_threads``.

    Returns:
        A :class:`CPEAdapter` whose config records preset, hyper-parameters, base model, seed and
        (in ``training``) the final losses and per-stage history of every concept.
    """
    context, _, results, name = train_concepts(
        pipe,
        concepts,
        preset=preset,
        anchors=anchors,
        steps=steps,
        seed=seed,
        device=device,
        progress=progress,
        callback=callback,
        checkpoint_dir=checkpoint_dir,
        resume_from=resume_from,
        **({} if recipe is None else {"recipe": recipe}),
        **({} if paraphrases is None else {"paraphrases": paraphrases}),
        **overrides,
    )
    return assemble(context, results, seed, steps, name)
