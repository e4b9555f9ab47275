"""`CPEConfig`: dict/JSON/folder round trips, forward compatibility and validation."""

from __future__ import annotations

import json
import warnings

import pytest
from safetensors import safe_open

from cpe_adapter import CPEAdapter, CPEAdapterError, CPEConfig
from cpe_adapter.config import CONFIG_NAME, FORMAT_VERSION, METADATA_KEY, WEIGHTS_NAME, ConceptSpec, TargetLayer
from cpe_adapter.errors import AdapterFileError

LAYERS = [TargetLayer("mid.attn2.to_k", 32, 32), TargetLayer("mid.attn2.to_v", 32, 32)]


def full_config() -> CPEConfig:
    return CPEConfig(
        concepts=[ConceptSpec("Van Gogh", "real photograph", 0.5), ConceptSpec("Claude Monet", "a painting", 0.3)],
        text_embed_dim=32,
        target_layers=list(LAYERS),
        gate_rank=4,
        residual_rank=2,
        alpha=2.0,
        tie_gate_qk=True,
        name="impressionists",
        base_model="org/base",
        base_model_revision="0" * 40,
        preset="styles",
        training={"eta": 0.5, "stages": 10},
        evaluation={"erase_score": 0.9},
    )


def test_dict_round_trip_is_lossless():
    config = full_config()
    data = config.to_dict()
    assert data["concepts"][1] == {"name": "Claude Monet", "neutral": "a painting", "eta": 0.3}
    assert data["target_layers"][0] == {"name": "mid.attn2.to_k", "in_features": 32, "out_features": 32}
    assert data["format_version"] == FORMAT_VERSION
    assert CPEConfig.from_dict(data) == config
    assert CPEConfig.from_dict(json.loads(json.dumps(data))) == config
    assert CPEConfig.from_json_string(config.to_json_string()) == config


def test_from_dict_builds_nested_dataclasses():
    config = CPEConfig.from_dict(full_config().to_dict())
    assert all(isinstance(c, ConceptSpec) for c in config.concepts)
    assert all(isinstance(t, TargetLayer) for t in config.target_layers)
    assert config.concept_names == ["Van Gogh", "Claude Monet"]
    assert config.layer_names == ["mid.attn2.to_k", "mid.attn2.to_v"]


def test_save_and_load_folder(tmp_path):
    config = full_config()
    path = config.save_pretrained(tmp_path)
    assert path == tmp_path / CONFIG_NAME
    assert json.loads(path.read_text(encoding="utf-8")) == config.to_dict()
    assert CPEConfig.from_pretrained(tmp_path) == config
    assert [p.name for p in tmp_path.iterdir()] == [CONFIG_NAME], "atomic save leaves no temporary file"


def test_save_is_utf8_json(tmp_path):
    config = CPEConfig.from_dict({**full_config().to_dict(), "concepts": [{"name": "Hokusai 北斎", "neutral": "a"}]})
    config.save_pretrained(tmp_path)
    assert "北斎" in (tmp_path / CONFIG_NAME).read_bytes().decode("utf-8")
    assert CPEConfig.from_pretrained(tmp_path).concept_names == ["Hokusai 北斎"]


def test_unknown_keys_are_ignored_with_a_warning():
    data = {**full_config().to_dict(), "future_knob": 3, "another_one": {"x": 1}}
    data["concepts"][0]["future_concept_field"] = True
    data["target_layers"][0]["future_layer_field"] = "x"
    with pytest.warns(UserWarning) as caught:
        config = CPEConfig.from_dict(data)
    messages = " ".join(str(w.message) for w in caught)
    assert all(key in messages for key in ("future_knob", "future_concept_field", "future_layer_field"))
    assert {w.filename for w in caught} == {__file__}, "each warning names the caller's line, not the library's"
    assert config == full_config()


def test_known_keys_only_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CPEConfig.from_dict(full_config().to_dict())


def test_newer_format_version_is_refused():
    data = {**full_config().to_dict(), "format_version": FORMAT_VERSION + 1}
    with pytest.raises(AdapterFileError, match="format_version") as info:
        CPEConfig.from_dict(data)
    assert "upgrade" in str(info.value).lower()
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("version", [0, -1, "1", 1.5, True])
def test_invalid_format_version_is_refused(version):
    with pytest.raises(CPEAdapterError, match="format_version"):
        CPEConfig.from_dict({**full_config().to_dict(), "format_version": version})


def test_missing_format_version_means_current():
    data = full_config().to_dict()
    del data["format_version"]
    assert CPEConfig.from_dict(data).format_version == FORMAT_VERSION


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"text_embed_dim": 64}, "text_embed_dim"),
        ({"gate_rank": 0}, "gate_rank"),
        ({"residual_rank": -2}, "residual_rank"),
        ({"alpha": float("nan")}, "alpha"),
        ({"target_layers": [LAYERS[0].__dict__, LAYERS[0].__dict__]}, "twice"),
    ],
)
def test_inconsistent_configs_are_refused(change, words):
    with pytest.raises(CPEAdapterError, match=words):
        CPEConfig.from_dict({**full_config().to_dict(), **change})


def test_not_json_is_a_clear_error():
    with pytest.raises(AdapterFileError, match="JSON"):
        CPEConfig.from_json_string("{not json")
    with pytest.raises(AdapterFileError, match="object"):
        CPEConfig.from_json_string("[1, 2]")


def test_config_is_also_in_the_weights_header(tmp_path):
    adapter = CPEAdapter.for_layers(LAYERS, ["Van Gogh"], preset="styles", name="vg")
    adapter.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as handle:
        header = handle.metadata()[METADATA_KEY]
    from_header = CPEConfig.from_json_string(header)
    assert from_header == CPEConfig.from_pretrained(tmp_path)
    assert from_header.concept_names == ["Van Gogh"] and from_header.name == "vg"
    assert from_header.preset == "styles" and from_header.training["eta"] == 0.5
    assert from_header.weights_sha256 == adapter.digest()
    alone = tmp_path / "alone"
    alone.mkdir()
    (tmp_path / WEIGHTS_NAME).rename(alone / "erase.safetensors")
    assert CPEConfig.from_pretrained(alone / "erase.safetensors") == from_header, "a lone file describes itself"
