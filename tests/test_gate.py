"""ResAG gate math (docs/concepts.md-3) against a direct per-token reference, and initialisation."""

from __future__ import annotations

import math

import pytest
import torch

from cpe_adapter import CPEAdapter, TargetLayer
from cpe_adapter.gate import best_concepts, gate_values, gated_mixed_embedding, token_mixing

D, M, R, T, B = 6, 4, 2, 5, 2
LAYERS = [TargetLayer("a.attn2.to_k", D, 3), TargetLayer("a.attn2.to_v", D, 4), TargetLayer("b.attn2.to_k", D, 5)]


def reference_gate(embeds: torch.Tensor, a: torch.Tensor, b: torch.Tensor, v: torch.Tensor):
    """docs/concepts.md steps 1-3 for one prompt ``[T, d]`` and one concept, written out with loops.

    Returns ``(S, Ē, g)``: ``S[t, s] = softmax_s((E_t A)·(E_s B))``, ``Ē_t = Σ_s S[t, s] E_s``,
    ``g_t = sigmoid(Ē_t · v)``.
    """
    tokens, dim = embeds.shape
    queries = [[sum(embeds[t, i] * a[i, j] for i in range(dim)) for j in range(a.shape[1])] for t in range(tokens)]
    keys = [[sum(embeds[t, i] * b[i, j] for i in range(dim)) for j in range(b.shape[1])] for t in range(tokens)]
    mixing = torch.zeros(tokens, tokens, dtype=torch.float64)
    for t in range(tokens):
        logits = [sum(q * k for q, k in zip(queries[t], keys[s], strict=True)) for s in range(tokens)]
        top = max(float(x) for x in logits)
        weights = [math.exp(float(x) - top) for x in logits]
        for s in range(tokens):
            mixing[t, s] = weights[s] / sum(weights)
    mixed = torch.zeros(tokens, dim, dtype=torch.float64)
    for t in range(tokens):
        for s in range(tokens):
            mixed[t] += mixing[t, s] * embeds[s]
    gates = torch.tensor([1.0 / (1.0 + math.exp(-float(mixed[t] @ v))) for t in range(tokens)], dtype=torch.float64)
    return mixing, mixed, gates


def reference_residual(embeds: torch.Tensor, adapter: CPEAdapter, concept: int) -> torch.Tensor:
    """docs/concepts.md step 4 for every layer of one concept: ``(alpha/r) (g ⊙ Ē) D_l U_l``, concatenated."""
    cfg = adapter.config
    _, mixed, gates = reference_gate(
        embeds, adapter.gate_a[concept], adapter.key_weight()[concept], adapter.gate_v[concept]
    )
    outputs = []
    column = 0
    for index, layer in enumerate(cfg.target_layers):
        down = adapter.down[concept][:, index * cfg.residual_rank : (index + 1) * cfg.residual_rank]
        up = adapter.up[concept][:, column : column + layer.out_features]
        column += layer.out_features
        out = torch.zeros(embeds.shape[0], layer.out_features, dtype=torch.float64)
        for t in range(embeds.shape[0]):
            out[t] = (cfg.alpha / cfg.residual_rank) * gates[t] * (mixed[t] @ down) @ up
        outputs.append(out)
    return torch.cat(outputs, dim=-1)


def random_gate_adapter(concepts: int = 3, tie: bool = False, seed: int = 0) -> CPEAdapter:
    adapter = CPEAdapter.for_layers(
        LAYERS, [f"concept {i}" for i in range(concepts)], gate_rank=M, residual_rank=R, alpha=1.5, tie_gate_qk=tie
    ).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64))
    return adapter.requires_grad_(False)


@pytest.fixture(scope="module")
def embeds() -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def test_gate_values_match_per_token_reference(embeds):
    adapter = random_gate_adapter()
    gates, mixing = gate_values(embeds, adapter.gate_a, adapter.gate_b, adapter.gate_v)
    assert gates.shape == (3, B, T) and mixing.shape == (3, B, T, T)
    for n in range(3):
        for b in range(B):
            ref_mixing, _, ref_gates = reference_gate(
                embeds[b], adapter.gate_a[n], adapter.gate_b[n], adapter.gate_v[n]
            )
            torch.testing.assert_close(mixing[n, b], ref_mixing, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(gates[n, b], ref_gates, rtol=1e-10, atol=1e-12)


def test_token_mixing_is_row_softmax_without_scaling(embeds):
    adapter = random_gate_adapter(concepts=1)
    mixing = token_mixing(embeds, adapter.gate_a, adapter.gate_b)
    logits = (embeds @ adapter.gate_a[0]) @ (embeds @ adapter.gate_b[0]).transpose(-1, -2)
    torch.testing.assert_close(mixing[0], torch.softmax(logits, dim=-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mixing.sum(-1), torch.ones(1, B, T, dtype=torch.float64))
    # Not symmetric in A and B: the query and key sides are different matrices.
    assert not torch.allclose(mixing, token_mixing(embeds, adapter.gate_b, adapter.gate_a))


def test_gated_mixed_embedding_matches_reference(embeds):
    adapter = random_gate_adapter()
    hidden = gated_mixed_embedding(embeds, adapter.gate_a, adapter.gate_b, adapter.gate_v)
    for n in range(3):
        for b in range(B):
            _, mixed, gates = reference_gate(embeds[b], adapter.gate_a[n], adapter.gate_b[n], adapter.gate_v[n])
            torch.testing.assert_close(hidden[n, b], gates[:, None] * mixed, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tie", [False, True])
def test_adapter_residuals_match_reference(embeds, tie):
    adapter = random_gate_adapter(tie=tie)
    with torch.no_grad():
        residuals = adapter.residuals(embeds)
    assert residuals.shape == (3, B, T, sum(t.out_features for t in LAYERS))
    for n in range(3):
        for b in range(B):
            with torch.no_grad():
                expected = reference_residual(embeds[b], adapter, n)
            torch.testing.assert_close(residuals[n, b], expected, rtol=1e-9, atol=1e-11)


def test_tie_gate_qk_uses_a_on_both_sides(embeds):
    tied = random_gate_adapter(tie=True)
    untied = random_gate_adapter(tie=False)
    with torch.no_grad():
        before_tied, before_untied = tied.residuals(embeds), untied.residuals(embeds)
        tied.gate_b.add_(1.0)
        untied.gate_b.add_(1.0)
        after_tied, after_untied = tied.residuals(embeds), untied.residuals(embeds)
    assert torch.equal(before_tied, after_tied), "tie_gate_qk must ignore gate_b"
    assert not torch.allclose(before_untied, after_untied), "untied gates must read gate_b"
    assert tied.key_weight() is tied.gate_a and untied.key_weight() is untied.gate_b
    # Tied mixing equals the untied formula with B := A.
    mixing = token_mixing(embeds, tied.gate_a, tied.gate_a)
    torch.testing.assert_close(mixing, token_mixing(embeds, tied.gate_a, tied.gate_a.clone()))


def test_initialisation_follows_method():
    torch.manual_seed(0)
    adapter = CPEAdapter.for_layers(LAYERS, ["Van Gogh", "Monet"], gate_rank=M, residual_rank=R)
    assert adapter.gate_a.abs().max() < 1e-6 and adapter.gate_b.abs().max() < 1e-6
    assert adapter.gate_a.abs().max() > 0, "A and B are tiny random values, not zero"
    assert torch.count_nonzero(adapter.gate_v) == 0
    assert torch.count_nonzero(adapter.up) == 0
    bound = 1.0 / math.sqrt(D)
    assert adapter.down.abs().max() <= bound and adapter.down.abs().max() > bound / 4
    embeds = torch.randn(B, T, D, generator=torch.Generator().manual_seed(3)) * 10
    with torch.no_grad():
        gates, mixing = gate_values(embeds, adapter.gate_a, adapter.gate_b, adapter.gate_v)
        residuals = adapter.residuals(embeds)
    assert torch.all(gates == 0.5), "v = 0 opens every gate at exactly 0.5"
    torch.testing.assert_close(mixing, torch.full_like(mixing, 1.0 / T), rtol=0, atol=1e-5)
    assert torch.count_nonzero(residuals) == 0, "U = 0: the untrained residual is exactly zero"


# ------------------------------------------------------------------------ routing over many concepts
def brute_force_routing(embeds, gate_a, gate_b, gate_v):
    """Top-1 routing in float64 with every concept's full gate: ``(gate, index, mixed)``, first on ties."""
    wide = embeds.double()
    key = gate_a if gate_b is None else gate_b
    gates, mixing = gate_values(wide, gate_a.double(), key.double(), gate_v.double())
    best = gates.amax(dim=0)
    index = (gates == best).to(torch.int8).argmax(dim=0)  # the first concept reaching the maximum
    rows = mixing.gather(0, index[None, :, :, None].expand(1, *mixing.shape[1:])).squeeze(0)
    return best, index, rows @ wide


def routing_case(seed: int, count: int, dim: int = 32, rank: int = 4, batch: int = 3, tokens: int = 9, *, kind: str):
    """Random routing problems. ``kind``: ``random`` (every gate in play), ``shut`` (trained-like: gates shut on
    most prompts, a few concepts open on some tokens), ``ties`` (duplicated concepts: exact ties), ``saturated``
    (several gates at exactly 1.0 in float32)."""
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, tokens, dim, generator=gen, dtype=torch.float64)
    gate_a = torch.randn(count, dim, rank, generator=gen, dtype=torch.float64)
    gate_b = torch.randn(count, dim, rank, generator=gen, dtype=torch.float64)
    gate_v = torch.randn(count, dim, generator=gen, dtype=torch.float64)
    if kind in ("shut", "ties"):
        # Trained-like: every v_c points away from a shared "generic text" direction, each concept by its own
        # amount (gates shut on ordinary tokens, some more than others), A and B mix weakly; a few concepts'
        # own direction is carried by one token of one prompt, where that gate opens.
        common = torch.randn(dim, generator=gen, dtype=torch.float64)
        keys = gate_v - (gate_v @ common)[:, None] * common / common.norm() ** 2  # orthogonal to `common`
        embeds = embeds * 0.1 + common
        depth = 2.0 + 28.0 * torch.rand(count, 1, generator=gen, dtype=torch.float64)
        gate_v = keys - depth * common / common.norm() ** 2
        gate_a, gate_b = gate_a * 0.02, gate_b * 0.02
        for _ in range(batch):  # about one opened concept per prompt
            concept = int(torch.randint(count, (1,), generator=gen))
            spot = torch.randint(batch, (1,), generator=gen), torch.randint(tokens, (1,), generator=gen)
            lift = (depth[concept] + 6.0) / keys[concept].norm() ** 2
            embeds[spot[0], spot[1]] += lift * keys[concept]
    if kind == "ties":
        order = torch.randperm(count, generator=gen)
        copies, targets = order[: count // 3], order[count // 3 : 2 * (count // 3)]
        gate_a[targets], gate_b[targets], gate_v[targets] = gate_a[copies], gate_b[copies], gate_v[copies]
    if kind == "saturated":
        gate_v = gate_v * 20.0
    return embeds, gate_a, gate_b, gate_v


@pytest.mark.parametrize("kind", ["random", "shut", "ties", "saturated"])
@pytest.mark.parametrize("count", [1, 2, 9, 37, 300])
@pytest.mark.parametrize("tie", [False, True])
def test_best_concepts_equal_brute_force_float64(kind, count, tie):
    for seed in range(4):
        embeds, gate_a, gate_b, gate_v = routing_case(seed * 1000 + count, count, kind=kind)
        key = None if tie else gate_b
        expected = brute_force_routing(embeds, gate_a, key, gate_v)
        for chunk in (4, 128):
            gate, index, mixed = best_concepts(embeds, gate_a, key, gate_v, chunk=chunk)
            assert torch.equal(index, expected[1]), (kind, seed, chunk)
            torch.testing.assert_close(gate, expected[0], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(mixed, expected[2], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["random", "shut", "ties", "saturated"])
def test_best_concepts_float32_matches_float64_reference(kind):
    """Float32 routing (ties from saturation and duplicates included) against the float64 brute force."""
    for seed in range(6):
        case = [t.float() for t in routing_case(seed + 50, 200, dim=16, tokens=11, kind=kind)]
        gate, index, mixed = best_concepts(*case, chunk=16)
        reference = brute_force_routing(*case)
        torch.testing.assert_close(gate.double(), reference[0], rtol=1e-4, atol=1e-5)
        # Float32 may break a (near-)tie differently, but its winner's exact gate is the best one.
        gates, mixing = gate_values(*[t.double() for t in case])
        chosen = gates.gather(0, index.unsqueeze(0)).squeeze(0)
        torch.testing.assert_close(chosen, reference[0], rtol=1e-4, atol=1e-5)
        rows = mixing.gather(0, index[None, :, :, None].expand(1, *mixing.shape[1:])).squeeze(0)
        torch.testing.assert_close(mixed.double(), rows @ case[0].double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["random", "shut"])
def test_duplicated_concepts_tie_exactly_in_float32(kind):
    """A concept's gate has the same bits wherever it sits (any chunk, any place in it), so a duplicate
    appended after the originals never wins, and the originals route exactly as they do alone."""
    case = [t.float() for t in routing_case(7, 40, dim=32, tokens=77, kind=kind)]
    embeds, concepts = case[0], case[1:]
    doubled = [torch.cat([t, t]) for t in concepts]  # concepts 40..79 repeat 0..39
    for chunk in (3, 16, 128):
        gate, index, mixed = best_concepts(embeds, *doubled, chunk=chunk)
        alone = best_concepts(embeds, *concepts, chunk=chunk)
        assert bool((index < 40).all()), (kind, chunk)
        assert torch.equal(index, alone[1]) and torch.equal(gate, alone[0]) and torch.equal(mixed, alone[2])


def test_best_concepts_gradients_match_brute_force():
    embeds, gate_a, gate_b, gate_v = routing_case(11, 40, kind="random")
    grads = []
    for route in (lambda *t: best_concepts(*t, chunk=8), brute_force_routing):
        leaves = [t.clone().requires_grad_(True) for t in (embeds, gate_a, gate_b, gate_v)]
        gate, _, mixed = route(*leaves)
        (gate.sum() + mixed.square().sum()).backward()
        grads.append([leaf.grad for leaf in leaves])
    for chunked, reference in zip(*grads, strict=True):
        torch.testing.assert_close(chunked, reference, rtol=1e-10, atol=1e-12)
