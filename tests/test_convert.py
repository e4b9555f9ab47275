"""Converting checkpoints of the paper's reference implementation (``cpe_adapter.convert``).

The reference files are generated here in the reference layout (random values), and the converted
adapter's residual is checked against a direct float64 computation of docs/concepts.md with the key
projection tied to the query one, as in the reference code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from cpe_adapter import CPEAdapter, CPEAdapterError
from cpe_adapter.cli import main
from cpe_adapter.convert import convert_reference_checkpoints
from cpe_adapter.runtime import get_runtime
from cpe_adapter.targets import find_target_layers
from cpe_adapter.testing import tiny_pipeline

GATE_PREFIX = "text_encoder_gate.attention_module1."
TOKENS = 9

_SHARED: dict[str, Any] = {}


@pytest.fixture
def pipe() -> Iterator[Any]:
    if "pipe" not in _SHARED:
        _SHARED["pipe"] = tiny_pipeline("sd")
    pipeline = _SHARED["pipe"]
    yield pipeline
    pipeline.unload_cpe_adapter()


def reference_name(module_path: str) -> str:
    return "lora_unet_" + module_path.replace(".", "_")


def reference_tensors(pipe: Any, seed: int = 0, m: int = 4, r: int = 2, alpha: float = 3.0) -> dict[str, torch.Tensor]:
    """A checkpoint in the reference layout for ``pipe`` (one concept, random float32 values)."""
    generator = torch.Generator().manual_seed(seed)
    layers = find_target_layers(pipe.unet)
    d = layers[0].in_features
    tensors = {
        GATE_PREFIX + "w_qs.weight": 0.3 * torch.randn(1, d, m, generator=generator),
        GATE_PREFIX + "w_ks.weight": 0.3 * torch.randn(1, d, m, generator=generator),
        "text_encoder_gate.gate.scaler.weight": torch.randn(1, d, 1, generator=generator),
    }
    for layer in layers:
        key = reference_name(layer.name)
        tensors[key + ".lora_down.weight"] = torch.randn(1, d, r, generator=generator) / d**0.5
        tensors[key + ".lora_up.weight"] = torch.randn(1, r, layer.out_features, generator=generator)
        tensors[key + ".alpha"] = torch.tensor(alpha)
    return tensors


def write(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def direct_residuals(tensors: dict[str, torch.Tensor], pipe: Any, embeds: torch.Tensor) -> torch.Tensor:
    """docs/concepts.md in float64 from the raw reference tensors, key side tied to A.

    ``S = softmax((E A)(E A)^T)``, ``Ē = S E``, ``g = sigmoid(Ē v)``,
    ``R_l = (alpha / r) (g ⊙ Ē) D_l U_l``; layers concatenated along the output axis.
    """
    e = embeds.double()
    a = tensors[GATE_PREFIX + "w_qs.weight"][0].double()
    v = tensors["text_encoder_gate.gate.scaler.weight"][0, :, 0].double()
    mixing = torch.softmax((e @ a) @ (e @ a).T, dim=-1)
    mixed = mixing @ e
    gate = torch.sigmoid(mixed @ v)
    parts = []
    for layer in find_target_layers(pipe.unet):
        key = reference_name(layer.name)
        down = tensors[key + ".lora_down.weight"][0].double()
        up = tensors[key + ".lora_up.weight"][0].double()
        alpha = float(tensors[key + ".alpha"])
        parts.append(alpha / down.shape[-1] * (gate[:, None] * mixed) @ down @ up)
    return torch.cat(parts, dim=-1)


def random_embeds(pipe: Any, seed: int = 1) -> torch.Tensor:
    d = pipe.unet.config.cross_attention_dim
    return torch.randn(TOKENS, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------ correctness
def test_converted_residual_matches_the_reference_math(pipe: Any, tmp_path: Path) -> None:
    raw = reference_tensors(pipe)
    adapter = convert_reference_checkpoints([write(raw, tmp_path / "van_gogh.safetensors")], pipe, preset="styles")
    config = adapter.config
    assert config.concept_names == ["van gogh"]
    assert config.concepts[0].neutral == "real photograph"
    assert config.tie_gate_qk is True
    assert (config.gate_rank, config.residual_rank, config.alpha) == (4, 2, 3.0)
    assert config.training["converted_from"] == ["van_gogh.safetensors"]
    assert torch.equal(adapter.gate_b[0], raw[GATE_PREFIX + "w_ks.weight"][0])

    embeds = random_embeds(pipe)
    converted = adapter.double().residuals(embeds[None])[0, 0]
    expected = direct_residuals(raw, pipe, embeds)
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(converted, expected, rtol=1e-10, atol=1e-12)

    untied = CPEAdapter.from_state_dict(adapter.file_state_dict(), {**config.to_dict(), "tie_gate_qk": False})
    assert not torch.allclose(untied.double().residuals(embeds[None])[0, 0], expected)


def test_loaded_conversion_routes_the_reference_residual(pipe: Any, tmp_path: Path) -> None:
    raw = reference_tensors(pipe, seed=4)
    adapter = convert_reference_checkpoints([write(raw, tmp_path / "ref.safetensors")], pipe, concepts=["Picasso"])
    adapter.save_pretrained(tmp_path / "converted")
    pipe.load_cpe_adapter(str(tmp_path / "converted"))
    embeds = random_embeds(pipe, seed=2)
    routed = get_runtime(pipe.unet).residual(embeds, embeds)
    torch.testing.assert_close(routed, direct_residuals(raw, pipe, embeds), rtol=1e-10, atol=1e-12)


def test_unused_key_gate_is_optional(pipe: Any, tmp_path: Path) -> None:
    """``w_ks`` never acted in the reference code (tied mixing), so a file without it converts the same."""
    raw = reference_tensors(pipe, seed=8)
    full = convert_reference_checkpoints([write(raw, tmp_path / "full.safetensors")], pipe)
    del raw[GATE_PREFIX + "w_ks.weight"]
    pruned = convert_reference_checkpoints([write(raw, tmp_path / "pruned.safetensors")], pipe)
    assert torch.equal(pruned.gate_b, pruned.gate_a)
    embeds = random_embeds(pipe)
    assert torch.equal(pruned.residuals(embeds[None].float()), full.residuals(embeds[None].float()))


def test_many_files_merge_in_the_given_order(pipe: Any, tmp_path: Path) -> None:
    raws = [reference_tensors(pipe, seed=s) for s in (10, 11, 12)]
    files = [write(raw, tmp_path / f"concept_{i}.safetensors") for i, raw in enumerate(raws)]
    adapter = convert_reference_checkpoints(files, pipe, concepts=["Monet", "Dali", "Klimt"], neutral="a painting")
    assert adapter.config.concept_names == ["Monet", "Dali", "Klimt"]
    assert {c.neutral for c in adapter.config.concepts} == {"a painting"}
    embeds = random_embeds(pipe)
    residuals = adapter.double().residuals(embeds[None])[:, 0]
    for index, raw in enumerate(raws):
        torch.testing.assert_close(residuals[index], direct_residuals(raw, pipe, embeds), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------- errors
def _drop_up(raw: dict[str, torch.Tensor]) -> None:
    del raw[next(k for k in raw if k.endswith(".lora_up.weight"))]


def _drop_gate(raw: dict[str, torch.Tensor]) -> None:
    del raw[GATE_PREFIX + "w_qs.weight"]


def _wide_gate(raw: dict[str, torch.Tensor]) -> None:
    raw[GATE_PREFIX + "w_qs.weight"] = torch.randn(1, 48, 4)


def _wrong_out(raw: dict[str, torch.Tensor]) -> None:
    key = next(k for k in raw if k.endswith(".lora_up.weight"))
    raw[key] = torch.randn(1, 2, raw[key].shape[-1] + 1)


def _unequal_alpha(raw: dict[str, torch.Tensor]) -> None:
    raw[next(k for k in raw if k.endswith(".alpha"))] = torch.tensor(7.0)


def _extra_layer(raw: dict[str, torch.Tensor]) -> None:
    raw["lora_unet_down_blocks_5_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"] = torch.zeros(1, 32, 2)


def _nan_values(raw: dict[str, torch.Tensor]) -> None:
    key = next(k for k in raw if k.endswith(".lora_down.weight"))
    raw[key][0, 0, 0] = float("nan")


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_drop_up, "missing"),
        (_drop_gate, "w_qs.weight"),
        (_wide_gate, r"expected \[1, 32, 4\]"),
        (_wrong_out, "another base model"),
        (_unequal_alpha, "different alpha"),
        (_extra_layer, "unexpected tensors"),
        (_nan_values, "finite"),
    ],
    ids=["missing-layer", "missing-gate", "text-dim", "out-dim", "alpha-per-layer", "extra-layer", "nan"],
)
def test_bad_checkpoints_are_refused_clearly(pipe: Any, tmp_path: Path, corrupt: Any, message: str) -> None:
    raw = reference_tensors(pipe)
    corrupt(raw)
    with pytest.raises(CPEAdapterError, match=message):
        convert_reference_checkpoints([write(raw, tmp_path / "bad.safetensors")], pipe)


def test_files_that_cannot_be_merged_are_refused(pipe: Any, tmp_path: Path) -> None:
    first = write(reference_tensors(pipe, seed=1), tmp_path / "a.safetensors")
    other_rank = write(reference_tensors(pipe, seed=2, r=1), tmp_path / "b.safetensors")
    other_alpha = write(reference_tensors(pipe, seed=3, alpha=1.0), tmp_path / "c.safetensors")
    with pytest.raises(CPEAdapterError, match="ranks"):
        convert_reference_checkpoints([first, other_rank], pipe)
    with pytest.raises(CPEAdapterError, match="alpha"):
        convert_reference_checkpoints([first, other_alpha], pipe)
    with pytest.raises(CPEAdapterError, match="one name per file"):
        convert_reference_checkpoints([first, other_alpha], pipe, concepts=["only one"])
    with pytest.raises(CPEAdapterError, match="does not exist"):
        convert_reference_checkpoints([tmp_path / "nowhere.safetensors"], pipe)
    pickled = tmp_path / "ref.bin"
    torch.save(reference_tensors(pipe), pickled)
    with pytest.raises(CPEAdapterError, match="pickle"):
        convert_reference_checkpoints([pickled], pipe)


def test_checkpoint_for_another_model_is_refused(tmp_path: Path) -> None:
    sd2 = tiny_pipeline("sd2")
    sd_checkpoint = write(reference_tensors(tiny_pipeline("sd")), tmp_path / "sd.safetensors")
    with pytest.raises(CPEAdapterError, match="another base model"):
        convert_reference_checkpoints([sd_checkpoint], sd2)


# -------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("layout", ["pipeline", "unet"])
def test_cli_converts_against_a_local_base_without_loading_weights(
    pipe: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str
) -> None:
    base = tmp_path / "base"
    pipe.unet.save_pretrained(base / "unet" if layout == "pipeline" else base)
    raws = [reference_tensors(pipe, seed=s) for s in (5, 6)]
    files = [str(write(raw, tmp_path / f"{i}.safetensors")) for i, raw in enumerate(raws)]
    out = tmp_path / "adapter"
    argv = ["--base", str(base), *files, "--concept", "Monet", "--concept", "Dali", "--out", str(out), "--json"]
    assert main(["convert", *argv]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["concepts"] == ["Monet", "Dali"]
    assert summary["layers"] == len(find_target_layers(pipe.unet))

    from_cli = CPEAdapter.from_pretrained(out)
    assert from_cli.config.base_model == str(base)
    in_process = convert_reference_checkpoints(files, pipe, concepts=["Monet", "Dali"])
    for key, tensor in in_process.file_state_dict().items():
        assert torch.equal(from_cli.file_state_dict()[key], tensor)


def test_cli_bad_input_exits_2_with_a_one_line_reason(
    pipe: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "base"
    pipe.unet.save_pretrained(base / "unet")
    raw = reference_tensors(pipe)
    _drop_gate(raw)
    broken = str(write(raw, tmp_path / "broken.safetensors"))
    assert main(["convert", "--base", str(base), broken, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "w_qs.weight" in err
    assert not (tmp_path / "out").exists()

    missing_base = str(tmp_path / "no_such_model")
    good = str(write(reference_tensors(pipe), tmp_path / "good.safetensors"))
    assert main(["convert", "--base", missing_base, good, "--out", str(tmp_path / "out")]) == 2
    assert "diffusers layout" in capsys.readouterr().err
    assert main(["convert", "--base", str(base), "--out", str(tmp_path / "out")]) == 2


def test_main_cli_convert_subcommand(tmp_path: Path) -> None:
    """``cpe-adapter convert`` as users run it, against the built-in tiny base."""

    raw = reference_tensors(tiny_pipeline("sd"), seed=9)
    file = str(write(raw, tmp_path / "van_gogh.safetensors"))
    with torch.enable_grad():
        assert main(["convert", "--base", "tiny:sd", file, "--concept", "Van Gogh", "--out", str(tmp_path / "a")]) == 0
    adapter = CPEAdapter.from_pretrained(tmp_path / "a")
    assert adapter.config.concept_names == ["Van Gogh"]
    assert adapter.config.tie_gate_qk
    assert main(["convert", "--base", "tiny:sd", file, "--out", str(tmp_path / "b")]) == 0
    assert torch.equal(CPEAdapter.from_pretrained(tmp_path / "b").up, adapter.up)


def test_cli_convert_never_replaces_an_adapter_unasked(tmp_path: Path, capsys: Any) -> None:
    raw = reference_tensors(tiny_pipeline("sd"), seed=9)
    file = str(write(raw, tmp_path / "van_gogh.safetensors"))
    out = tmp_path / "a"
    base = ["convert", "--base", "tiny:sd", file, "--out", str(out)]
    assert main([*base, "--concept", "Van Gogh"]) == 0
    (out / "checkpoints").mkdir()
    before = (out / "cpe_config.json").read_bytes()
    assert main([*base, "--concept", "Other"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "cpe_config.json").read_bytes() == before
    assert main([*base, "--concept", "Other", "--overwrite"]) == 0
    assert CPEAdapter.from_pretrained(out).config.concept_names == ["Other"]
    assert not (out / "checkpoints").exists(), "the replaced adapter's training checkpoints go with it"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--neutral", ""], "neutral phrase must be non-empty"),
        (["--concept", "a person"], "mapped toward itself"),
        (["SAME"], "same checkpoint file is given twice"),
        (["OTHER", "--concept", "Van Gogh", "--concept", "van gogh"], "named twice"),
    ],
)
def test_cli_convert_refuses_what_training_refuses(tmp_path: Path, capsys: Any, extra: list[str], message: str) -> None:
    raw = reference_tensors(tiny_pipeline("sd"), seed=9)
    file = str(write(raw, tmp_path / "van_gogh.safetensors"))
    other = str(write(raw, tmp_path / "other.safetensors"))
    extra = [{"SAME": file, "OTHER": other}.get(e, e) for e in extra]
    argv = ["convert", "--base", "tiny:sd", file, *extra, "--out", str(tmp_path / "a")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
