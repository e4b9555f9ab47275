"""Layer weights c_l: the Lipschitz bounds of docs/training.md, checked against direct SVDs."""

from __future__ import annotations

import pytest
import torch

from cpe_adapter.lipschitz import layer_weights
from cpe_adapter.targets import cross_attention_modules, find_target_layers
from cpe_adapter.testing import tiny_pipeline


def sigma(matrix: torch.Tensor) -> float:
    return torch.linalg.svdvals(matrix.detach())[0].item()


@pytest.mark.parametrize("tokens", [77, 9])
def test_layer_weights_are_the_method_lipschitz_constants(tokens: int) -> None:
    unet = tiny_pipeline("sd").unet
    weights = layer_weights(unet, tokens=tokens)
    attentions = cross_attention_modules(unet)
    assert weights.shape == (len(find_target_layers(unet)),) == (2 * len(attentions),)
    for index, (_, attn) in enumerate(attentions):
        w_q, w_v, w_o = attn.to_q.weight, attn.to_v.weight, attn.to_out[0].weight
        assert weights[2 * index].item() == pytest.approx(sigma(w_o @ w_v) * sigma(w_q) / tokens, rel=1e-4)
        assert weights[2 * index + 1].item() == pytest.approx(sigma(w_o), rel=1e-4)


def test_bad_token_count_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        layer_weights(tiny_pipeline("sd").unet, tokens=0)
