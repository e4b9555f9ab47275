"""The training losses in closed form (`cpe_adapter.losses`) equal the errors of the real projections."""

from __future__ import annotations

import pytest
import torch

from conftest import kv_projections
from cpe_adapter import CPEAdapter
from cpe_adapter.losses import base_energy, build_stack, coupling, cross_term, gate_codes, residual_energy
from cpe_adapter.targets import find_target_layers
from cpe_adapter.testing import tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd")


def test_low_rank_losses_equal_explicit_projections(pipe):
    """``u G u + 2<h, uM> + hQh`` equals the layer-weighted error of the real projections plus residual."""
    layers = find_target_layers(pipe.unet)
    stack = build_stack(pipe.unet, layers, 77, "cpu")
    gen = torch.Generator().manual_seed(1)
    d, m, r = 32, 4, 2
    config = CPEAdapter.for_layers(layers, "x", "explicit", gate_rank=m, residual_rank=r, alpha=1.0).config
    adapter = CPEAdapter(config, init=False)
    with torch.no_grad():
        for param in adapter.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    e_t, e_n, delta = (torch.randn(2, 77, d, generator=gen) for _ in range(3))
    eta = 0.5
    base = kv_projections(pipe, torch.cat([e_t, e_n, e_t + delta]))
    p_t, p_n, p_adv = base[:2], base[2:4], base[4:]
    residual = adapter.residuals(torch.cat([e_t, e_t + delta]))[0].detach()
    goal = (1 + eta) * p_n - eta * p_t
    explicit_erase = ((p_t + residual[:2] - goal).pow(2) * stack.column_weight).sum(-1).mean(-1)
    explicit_adv = ((p_adv + residual[2:] - goal).pow(2) * stack.column_weight).sum(-1).mean(-1)
    explicit_attack = ((p_adv + residual[2:] - p_t).pow(2) * stack.column_weight).sum(-1).mean(-1)

    params = {k: getattr(adapter, k)[0].detach() for k in ("gate_a", "gate_b", "gate_v", "down", "up")}
    codes, _ = gate_codes(
        torch.cat([e_t, e_t + delta]), *[params[k] for k in ("gate_a", "gate_b", "gate_v", "down")], 0.5
    )
    mm, q = coupling(stack, params["up"])
    u_erase = (1 + eta) * (e_t - e_n)
    erase = base_energy(u_erase, stack.gram) + cross_term(codes[:2], u_erase, mm) + residual_energy(codes[:2], q)
    adv = base_energy(u_erase + delta, stack.gram) + cross_term(codes[2:], u_erase + delta, mm)
    adv = adv + residual_energy(codes[2:], q)
    attack = base_energy(delta, stack.gram) + cross_term(codes[2:], delta, mm) + residual_energy(codes[2:], q)
    torch.testing.assert_close(erase, explicit_erase, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(adv, explicit_adv, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(attack, explicit_attack, rtol=1e-4, atol=1e-6)
    # Anchoring: P'(x) - P(x) is the residual alone.
    explicit_anchor = (residual.pow(2) * stack.column_weight).sum(-1).mean(-1)
    torch.testing.assert_close(residual_energy(codes, q), explicit_anchor, rtol=1e-4, atol=1e-8)


def test_quadratic_form_gradient_matches_autograd(pipe):
    stack = build_stack(pipe.unet, find_target_layers(pipe.unet), 77, "cpu")
    x = torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    base_energy(x, stack.gram).sum().backward()
    expected = torch.autograd.grad(((x @ stack.weight.T).pow(2) * stack.column_weight).sum() / 77, x)[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-7)
