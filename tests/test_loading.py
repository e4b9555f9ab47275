"""Saving and loading adapters: every accepted source, the file layout of docs/format.md, names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cpe_adapter
from conftest import generate, random_adapter, unet_inputs, unet_output
from cpe_adapter import CPEAdapter, CPEAdapterError, CPEConfig
from cpe_adapter.config import CONFIG_NAME, METADATA_KEY, WEIGHTS_NAME
from cpe_adapter.testing import tiny_pipeline


@pytest.fixture(scope="module")
def adapter() -> CPEAdapter:
    return random_adapter(tiny_pipeline("sd"), ["Van Gogh", "Claude Monet"], seed=3, preset="styles")


@pytest.fixture(scope="module")
def saved(adapter, tmp_path_factory) -> Path:
    """The adapter saved through a pipeline (``pipe.save_cpe_adapter``)."""
    pipe = tiny_pipeline("sd")
    pipe.load_cpe_adapter(CPEAdapter.from_state_dict(adapter.file_state_dict(), adapter.config), adapter_name="vg")
    folder = tmp_path_factory.mktemp("saved") / "vg-eraser"
    assert pipe.save_cpe_adapter(folder) == folder
    return folder


@pytest.fixture(scope="module")
def object_image(adapter) -> np.ndarray:
    """Output with the in-memory adapter object loaded: what every round trip must reproduce bitwise."""
    pipe = tiny_pipeline("sd")
    pipe.load_cpe_adapter(CPEAdapter.from_state_dict(adapter.file_state_dict(), adapter.config))
    return generate(pipe)


def _sources(kind: str, saved: Path, adapter: CPEAdapter):
    if kind == "folder":
        return saved
    if kind == "folder-str":
        return str(saved)
    if kind == "file":
        return saved / WEIGHTS_NAME
    if kind == "state-dict+config":
        return (load_file(saved / WEIGHTS_NAME), CPEConfig.from_pretrained(saved))
    if kind == "state-dict+dict":
        return (adapter.file_state_dict(), adapter.config.to_dict())
    return CPEAdapter.from_pretrained(saved)


@pytest.mark.parametrize("kind", ["folder", "folder-str", "file", "state-dict+config", "state-dict+dict", "object"])
def test_round_trip_is_bitwise(kind, saved, adapter, object_image):
    pipe = tiny_pipeline("sd")
    name = pipe.load_cpe_adapter(_sources(kind, saved, adapter))
    assert pipe.get_active_cpe_adapters() == [name]
    loaded = pipe.get_cpe_adapter(name).file_state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in adapter.file_state_dict().items())
    np.testing.assert_array_equal(generate(pipe), object_image)


def test_folder_holds_the_three_files(saved):
    assert sorted(p.name for p in saved.iterdir()) == sorted(["README.md", CONFIG_NAME, WEIGHTS_NAME])


def test_tensor_names_follow_the_documented_layout(saved, adapter):
    cfg = adapter.config
    n, d, m, r = cfg.num_concepts, cfg.text_embed_dim, cfg.gate_rank, cfg.residual_rank
    expected = {"gate.A": (n, d, m), "gate.B": (n, d, m), "gate.v": (n, d)}
    for layer in cfg.target_layers:
        expected[f"{layer.name}.down"] = (n, d, r)
        expected[f"{layer.name}.up"] = (n, r, layer.out_features)
    with safe_open(str(saved / WEIGHTS_NAME), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    assert shapes == expected
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.down" in shapes
    assert not any("lora" in key.lower() for key in shapes)
    tensors = load_file(saved / WEIGHTS_NAME)
    column = 0
    for index, layer in enumerate(cfg.target_layers):  # per-layer slices of the concatenated parameters
        assert torch.equal(tensors[f"{layer.name}.down"], adapter.down[:, :, index * r : (index + 1) * r])
        assert torch.equal(tensors[f"{layer.name}.up"], adapter.up[:, :, column : column + layer.out_features])
        column += layer.out_features


def test_header_metadata_holds_the_config(saved):
    with safe_open(str(saved / WEIGHTS_NAME), framework="pt") as handle:
        metadata = handle.metadata()
    from_header = json.loads(metadata[METADATA_KEY])
    from_file = json.loads((saved / CONFIG_NAME).read_text(encoding="utf-8"))
    assert from_header == from_file
    assert from_file["concepts"][0]["name"] == "Van Gogh" and from_file["format_version"] == 1


def test_saved_config_records_provenance(saved, adapter):
    config = CPEConfig.from_pretrained(saved)
    assert config.weights_sha256 == adapter.digest() == CPEAdapter.from_pretrained(saved).digest()
    assert config.library_version == cpe_adapter.__version__
    assert config.preset == "styles"


def test_lone_safetensors_file_is_self_describing(saved, tmp_path, object_image):
    lone = tmp_path / "renamed.safetensors"
    shutil.copyfile(saved / WEIGHTS_NAME, lone)
    pipe = tiny_pipeline("sd")
    assert pipe.load_cpe_adapter(lone) == "renamed"
    assert pipe.list_cpe_adapters()["renamed"].concept_names == ["Van Gogh", "Claude Monet"]
    np.testing.assert_array_equal(generate(pipe), object_image)


def test_folder_without_config_json_uses_the_header(saved, tmp_path, adapter):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    shutil.copyfile(saved / WEIGHTS_NAME, folder / WEIGHTS_NAME)
    loaded = CPEAdapter.from_pretrained(folder)
    assert loaded.digest() == adapter.digest()


def test_weight_name_in_a_folder(saved, tmp_path, adapter):
    folder = tmp_path / "custom"
    folder.mkdir()
    shutil.copyfile(saved / WEIGHTS_NAME, folder / "eraser-v2.safetensors")
    shutil.copyfile(saved / CONFIG_NAME, folder / CONFIG_NAME)
    pipe = tiny_pipeline("sd")
    name = pipe.load_cpe_adapter(folder, weight_name="eraser-v2.safetensors")
    assert pipe.get_cpe_adapter(name).digest() == adapter.digest()


def test_subfolder_in_a_folder(saved, tmp_path, adapter):
    shutil.copytree(saved, tmp_path / "repo" / "erasers" / "vg")
    loaded = CPEAdapter.from_pretrained(tmp_path / "repo", subfolder="erasers/vg")
    assert loaded.digest() == adapter.digest()


def test_load_lora_weights_rejects_our_file(saved):
    pipe = tiny_pipeline("sd")
    with pytest.raises(ValueError):
        pipe.load_lora_weights(str(saved / WEIGHTS_NAME))
    with pytest.raises(ValueError):
        pipe.load_lora_weights(str(saved), weight_name=WEIGHTS_NAME)
    assert not pipe.get_list_adapters()


def test_layer_order_in_the_file_does_not_matter(adapter):
    """An adapter whose config lists the layers in another order is matched by name, not position."""
    tensors = adapter.file_state_dict()
    data = adapter.config.to_dict()
    data["target_layers"] = list(reversed(data["target_layers"]))
    pipe = tiny_pipeline("sd")
    pipe.load_cpe_adapter((tensors, data), adapter_name="reversed")
    reference = tiny_pipeline("sd")
    reference.load_cpe_adapter((adapter.file_state_dict(), adapter.config.to_dict()), adapter_name="straight")
    inputs = unet_inputs(pipe)
    torch.testing.assert_close(unet_output(pipe, inputs), unet_output(reference, inputs), rtol=1e-6, atol=1e-6)


def test_default_names_are_unique_and_returned(saved, adapter):
    pipe = tiny_pipeline("sd")
    first = pipe.load_cpe_adapter(saved)
    second = pipe.load_cpe_adapter(saved)
    named = CPEAdapter.from_state_dict(adapter.file_state_dict(), {**adapter.config.to_dict(), "name": "monet"})
    third = pipe.load_cpe_adapter(named)
    assert first == "vg-eraser" and second != first and third == "monet"
    assert sorted(pipe.list_cpe_adapters()) == sorted([first, second, third])
    assert pipe.get_active_cpe_adapters() == [first, second, third]


def test_an_unnamed_adapter_is_named_after_its_folder_or_file(adapter, tmp_path):
    unnamed = CPEAdapter.from_state_dict(adapter.file_state_dict(), {**adapter.config.to_dict(), "name": None})
    unnamed.save_pretrained(tmp_path / "erase-monet")
    (tmp_path / "loose").mkdir()
    shutil.copyfile(tmp_path / "erase-monet" / "cpe_adapter.safetensors", tmp_path / "loose" / "monet-v2.safetensors")
    pipe = tiny_pipeline("sd")
    assert pipe.load_cpe_adapter(tmp_path / "erase-monet") == "erase-monet"
    assert pipe.load_cpe_adapter(tmp_path / "erase-monet" / "cpe_adapter.safetensors") == "erase-monet_1"
    assert pipe.load_cpe_adapter(tmp_path / "loose" / "monet-v2.safetensors") == "monet-v2"


def test_save_needs_a_name_when_several_are_loaded(saved, tmp_path):
    pipe = tiny_pipeline("sd")
    pipe.load_cpe_adapter(saved, adapter_name="a")
    pipe.load_cpe_adapter(saved, adapter_name="b")
    with pytest.raises(CPEAdapterError, match="adapter_name"):
        pipe.save_cpe_adapter(tmp_path / "out")
    pipe.save_cpe_adapter(tmp_path / "out", adapter_name="b")
    assert CPEAdapter.from_pretrained(tmp_path / "out").digest() == pipe.get_cpe_adapter("b").digest()


def test_saving_after_a_dtype_move_keeps_values(adapter, tmp_path):
    pipe = tiny_pipeline("sd").to(torch.float64)
    pipe.load_cpe_adapter((adapter.file_state_dict(), adapter.config))
    pipe.save_cpe_adapter(tmp_path)
    reloaded = CPEAdapter.from_pretrained(tmp_path)
    assert reloaded.gate_v.dtype == torch.float32
    assert all(torch.equal(reloaded.file_state_dict()[k], v) for k, v in adapter.file_state_dict().items())


def test_save_writes_no_temporary_files(adapter, tmp_path):
    copy = CPEAdapter.from_state_dict(adapter.file_state_dict(), adapter.config)
    copy.save_pretrained(tmp_path)
    copy.save_pretrained(tmp_path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["README.md", CONFIG_NAME, WEIGHTS_NAME])


def test_functions_work_on_a_bare_unet(saved, adapter):
    pipe = tiny_pipeline("sd")
    name = cpe_adapter.load_cpe_adapter(pipe.unet, saved)
    assert cpe_adapter.get_active_cpe_adapters(pipe.unet) == [name]
    assert pipe.get_active_cpe_adapters() == [name], "pipeline and bare UNet see the same runtime"
    cpe_adapter.unload_cpe_adapter(pipe.unet)
    assert pipe.list_cpe_adapters() == {}


def test_files_written_by_hand_load(adapter, tmp_path):
    """Another tool writing the documented layout (plain save_file, no metadata) plus a config is readable."""
    save_file(adapter.file_state_dict(), str(tmp_path / WEIGHTS_NAME))
    (tmp_path / CONFIG_NAME).write_text(json.dumps(adapter.config.to_dict()), encoding="utf-8")
    assert CPEAdapter.from_pretrained(tmp_path).digest() == adapter.digest()


def test_saving_to_a_file_name_is_refused_with_the_folder_to_use(adapter, tmp_path):
    with pytest.raises(CPEAdapterError, match="saved as a folder"):
        adapter.save_pretrained(tmp_path / "erase.safetensors")
    assert not (tmp_path / "erase.safetensors").exists()


def test_model_card_keeps_long_training_records_out_of_its_table(adapter, tmp_path):
    from cpe_adapter.model_card import model_card

    config = CPEConfig.from_dict(
        {**adapter.config.to_dict(), "training": {"steps": 240, "history": {"x": [{"loss": 0.1}] * 50}}}
    )
    text = str(model_card(config))
    assert "| steps | 240 |" in text
    assert "0.1" not in text and "`history` | in `cpe_config.json`" in text
