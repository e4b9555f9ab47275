"""Bad input: each refused with a specific message, and nothing already loaded disturbed.

Every test runs against one pipeline that holds a working adapter called "good"; after the failed
call, that adapter's output must be bitwise what it was and the loaded/active sets unchanged.
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import generate, random_adapter, unet_inputs, unet_output
from cpe_adapter import (
    AdapterFileError,
    CPEAdapter,
    CPEAdapterError,
    CPEConfig,
    ErasureIntegrityError,
    IncompatibleAdapterError,
)
from cpe_adapter.config import CONFIG_NAME, METADATA_KEY, WEIGHTS_NAME
from cpe_adapter.testing import tiny_pipeline


class Loaded:
    """The shared pipeline with adapter "good", and a snapshot of its observable state."""

    def __init__(self) -> None:
        self.pipe = tiny_pipeline("sd")
        self.adapter = random_adapter(self.pipe, seed=9)
        self.pipe.load_cpe_adapter(
            CPEAdapter.from_state_dict(self.adapter.file_state_dict(), self.adapter.config), adapter_name="good"
        )
        self.inputs = unet_inputs(self.pipe)
        self.output = unet_output(self.pipe, self.inputs)
        plain = tiny_pipeline("sd")
        assert not torch.allclose(self.output, unet_output(plain, self.inputs)), "the adapter must act"

    def assert_undisturbed(self) -> None:
        assert list(self.pipe.list_cpe_adapters()) == ["good"]
        assert self.pipe.get_active_cpe_adapters() == ["good"]
        state = self.pipe.get_cpe_adapter("good").file_state_dict()
        assert all(torch.equal(state[k], v) for k, v in self.adapter.file_state_dict().items())
        torch.testing.assert_close(unet_output(self.pipe, self.inputs), self.output, rtol=0, atol=0)


@pytest.fixture(scope="module")
def _shared() -> dict[str, Loaded]:
    return {"value": Loaded()}


@pytest.fixture
def loaded(_shared) -> Iterator[Loaded]:
    """The shared pipeline; rebuilt after a test that broke it, so one bug fails one test only."""
    yield _shared["value"]
    pipe = _shared["value"].pipe
    if list(pipe.list_cpe_adapters()) != ["good"] or pipe.get_active_cpe_adapters() != ["good"]:
        _shared["value"] = Loaded()


@pytest.fixture(scope="module")
def good_adapter(_shared) -> CPEAdapter:
    return _shared["value"].adapter


@pytest.fixture(scope="module")
def good_folder(good_adapter, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    CPEAdapter.from_state_dict(good_adapter.file_state_dict(), good_adapter.config).save_pretrained(folder)
    return folder


def refused(loaded: Loaded, error: type[Exception], words: list[str], call, *args, **kwargs) -> str:
    """Run the failing call, check the error type and key words, and that "good" is untouched."""
    with pytest.raises(error) as info:
        call(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    message = str(info.value).lower()
    for word in words:
        assert word.lower() in message, f"{word!r} not in {message!r}"
    loaded.assert_undisturbed()
    return message


# ------------------------------------------------------------------------------ incompatible
def test_adapter_for_another_embedding_dimension(loaded):
    other = random_adapter(tiny_pipeline("sd2"), seed=1)
    assert other.config.text_embed_dim == 64
    message = refused(
        loaded, IncompatibleAdapterError, ["64", "32", "text embeddings"], loaded.pipe.load_cpe_adapter, other
    )
    assert "base model" in message


def test_adapter_for_another_layer_layout(loaded):
    data = loaded.adapter.config.to_dict()
    dropped = data["target_layers"].pop()["name"]
    tensors = {k: v for k, v in loaded.adapter.file_state_dict().items() if not k.startswith(dropped + ".")}
    message = refused(loaded, IncompatibleAdapterError, ["layer layout"], loaded.pipe.load_cpe_adapter, (tensors, data))
    assert dropped in message


def test_adapter_with_other_output_sizes(loaded):
    data = loaded.adapter.config.to_dict()
    data["target_layers"][0]["out_features"] = 48
    layer = data["target_layers"][0]["name"]
    tensors = loaded.adapter.file_state_dict()
    tensors[f"{layer}.up"] = torch.zeros(1, 1, 48)
    refused(loaded, IncompatibleAdapterError, ["layer layout"], loaded.pipe.load_cpe_adapter, (tensors, data))


def test_hand_made_config_for_other_dims(loaded):
    data = loaded.adapter.config.to_dict()
    data["text_embed_dim"] = 16
    for layer in data["target_layers"]:
        layer["in_features"] = 16
    adapter = CPEAdapter(CPEConfig.from_dict(data))
    refused(loaded, IncompatibleAdapterError, ["16", "32"], loaded.pipe.load_cpe_adapter, adapter)


# ------------------------------------------------------------------------------ broken files
def test_corrupt_safetensors(loaded, tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{this is not json}" + bytes(64))
    refused(loaded, AdapterFileError, ["broken.safetensors", "re-"], loaded.pipe.load_cpe_adapter, path)


def test_random_bytes_file(loaded, tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy().tobytes()
    )
    refused(loaded, AdapterFileError, ["noise.safetensors"], loaded.pipe.load_cpe_adapter, path)


@pytest.mark.parametrize("keep", [4, 200, -100])
def test_truncated_safetensors(loaded, good_folder, tmp_path, keep):
    data = (good_folder / WEIGHTS_NAME).read_bytes()
    folder = tmp_path / "truncated"
    folder.mkdir()
    shutil.copyfile(good_folder / CONFIG_NAME, folder / CONFIG_NAME)
    (folder / WEIGHTS_NAME).write_bytes(data[:keep])
    refused(loaded, AdapterFileError, [WEIGHTS_NAME], loaded.pipe.load_cpe_adapter, folder)


def test_weights_from_another_adapter(loaded, good_folder, tmp_path):
    folder = tmp_path / "mismatch"
    shutil.copytree(good_folder, folder)
    other = random_adapter(tiny_pipeline("sd"), ["a", "b"], seed=2)
    save_file(other.file_state_dict(), str(folder / WEIGHTS_NAME))
    refused(loaded, AdapterFileError, ["shape"], loaded.pipe.load_cpe_adapter, folder)


def test_empty_folder(loaded, tmp_path):
    refused(loaded, AdapterFileError, [WEIGHTS_NAME], loaded.pipe.load_cpe_adapter, tmp_path)


def test_missing_path(loaded, tmp_path):
    refused(loaded, AdapterFileError, ["does not exist"], loaded.pipe.load_cpe_adapter, str(tmp_path / "nowhere" / "x"))


def test_weights_without_any_config(loaded, good_folder, tmp_path):
    save_file(loaded.adapter.file_state_dict(), str(tmp_path / WEIGHTS_NAME))  # no metadata
    refused(loaded, AdapterFileError, ["cpe_adapter_metadata", CONFIG_NAME], loaded.pipe.load_cpe_adapter, tmp_path)


def _lone_file(loaded: Loaded, folder: Path, header: str, tensors: dict | None = None) -> Path:
    """A lone weights file whose header carries ``header`` as its config copy."""
    path = folder / "lone.safetensors"
    save_file(tensors or loaded.adapter.file_state_dict(), str(path), metadata={METADATA_KEY: header})
    return path


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda text: text.replace('"gate_rank": ', '"gate_rank": 1' + "0" * 5000 + "+"), ["not valid json"]),
        (lambda text: "[" * 100_000 + "]" * 100_000, ["not valid json"]),
        (lambda text: text.replace('"training": {', '"training": {"deep": ' + "[" * 40 + "]" * 40 + ", "), ["nests"]),
        (lambda text: text.replace('"alpha": 1.0', '"alpha": 1e30'), ["alpha"]),
        (lambda text: text.replace('"alpha": 1.0', '"alpha": 0'), ["alpha"]),
    ],
    ids=["huge-integer", "deep-nesting", "nested-training", "huge-alpha", "zero-alpha"],
)
def test_hostile_config_text_in_a_folder_and_in_a_lone_file(loaded, good_folder, tmp_path, mutate, words):
    text = mutate((good_folder / CONFIG_NAME).read_text())
    assert text != (good_folder / CONFIG_NAME).read_text()
    (tmp_path / "folder").mkdir()
    shutil.copyfile(good_folder / WEIGHTS_NAME, tmp_path / "folder" / WEIGHTS_NAME)
    (tmp_path / "folder" / CONFIG_NAME).write_text(text)
    refused(loaded, CPEAdapterError, words, loaded.pipe.load_cpe_adapter, tmp_path / "folder", "bad")
    refused(loaded, CPEAdapterError, words, loaded.pipe.load_cpe_adapter, _lone_file(loaded, tmp_path, text), "bad")


def test_weights_that_overflow_the_parameter_dtype(loaded, tmp_path):
    """Finite in the file, infinite once stored: float64 beyond float32's range, or float32 values
    beyond float16's range in a float16 pipeline."""
    tensors = {k: v.double() for k, v in loaded.adapter.file_state_dict().items()}
    tensors["gate.v"][0, 0] = 1e300
    header = loaded.adapter.config.to_json_string()
    refused(
        loaded,
        AdapterFileError,
        ["overflows"],
        loaded.pipe.load_cpe_adapter,
        _lone_file(loaded, tmp_path, header, tensors),
    )
    source = (tensors, loaded.adapter.config)
    refused(loaded, AdapterFileError, ["overflows"], loaded.pipe.load_cpe_adapter, source, "bad")
    half = tiny_pipeline("sd").to(torch.float16)
    big = {k: v.clone() for k, v in loaded.adapter.file_state_dict().items()}
    big["gate.v"][0, 0] = 1e5
    with pytest.raises(AdapterFileError, match="float16"):
        half.load_cpe_adapter((big, loaded.adapter.config), "big")
    assert half.list_cpe_adapters() == {}


def test_a_save_torn_between_two_adapters_of_one_structure_is_refused(loaded, tmp_path, monkeypatch):
    """Same concepts and layout, other weights: the weights' hash in the two copies tells them apart."""
    first = random_adapter(loaded.pipe, seed=31)
    first.save_pretrained(tmp_path)
    second = random_adapter(loaded.pipe, seed=32)
    monkeypatch.setattr(CPEConfig, "save_pretrained", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(tmp_path)  # weights written, config not: the folder is torn
    monkeypatch.undo()
    refused(loaded, AdapterFileError, ["disagree", "weights_sha256"], loaded.pipe.load_cpe_adapter, tmp_path, "torn")


def test_odd_sources_are_refused(loaded):
    refused(loaded, CPEAdapterError, ["empty path"], loaded.pipe.load_cpe_adapter, "", "x")
    meta = {k: torch.empty_like(v, device="meta") for k, v in loaded.adapter.file_state_dict().items()}
    refused(loaded, AdapterFileError, ["meta"], loaded.pipe.load_cpe_adapter, (meta, loaded.adapter.config), "x")
    unpaired = {**loaded.adapter.config.to_dict()}
    unpaired["concepts"] = [{**unpaired["concepts"][0], "name": "bad \ud800 name"}]
    source = (loaded.adapter.file_state_dict(), unpaired)
    refused(loaded, CPEAdapterError, ["unicode"], loaded.pipe.load_cpe_adapter, source, "x")


def test_config_that_is_not_json(loaded, good_folder, tmp_path):
    shutil.copyfile(good_folder / WEIGHTS_NAME, tmp_path / WEIGHTS_NAME)
    (tmp_path / CONFIG_NAME).write_text('{"concepts": [', encoding="utf-8")
    refused(loaded, AdapterFileError, ["json"], loaded.pipe.load_cpe_adapter, tmp_path)


@pytest.mark.parametrize("version", [2, 99])
def test_newer_format_version(loaded, good_folder, tmp_path, version):
    shutil.copyfile(good_folder / WEIGHTS_NAME, tmp_path / WEIGHTS_NAME)
    text = (good_folder / CONFIG_NAME).read_text(encoding="utf-8")
    (tmp_path / CONFIG_NAME).write_text(text.replace('"format_version": 1', f'"format_version": {version}'))
    refused(
        loaded, AdapterFileError, ["format_version", str(version), "upgrade"], loaded.pipe.load_cpe_adapter, tmp_path
    )


# ------------------------------------------------------------------------------------ pickle
@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail the test if anything tries to unpickle."""

    def forbidden(*args, **kwargs):
        raise AssertionError("cpe-adapter tried to unpickle a file")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)


@pytest.mark.parametrize("filename", ["adapter.bin", "adapter.pt", "adapter.ckpt", "cpe_adapter.safetensors"])
def test_pickle_files_are_refused_unread(loaded, tmp_path, filename, no_unpickling):
    path = tmp_path / filename
    torch.save(loaded.adapter.file_state_dict(), path)
    refused(loaded, AdapterFileError, ["pickle", "safetensors"], loaded.pipe.load_cpe_adapter, path)


def test_pickle_weight_name_in_a_folder(loaded, good_folder, tmp_path, no_unpickling):
    shutil.copyfile(good_folder / CONFIG_NAME, tmp_path / CONFIG_NAME)
    with open(tmp_path / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"gate.A": torch.zeros(1)}, handle)
    refused(
        loaded, AdapterFileError, ["pickle"], loaded.pipe.load_cpe_adapter, tmp_path, weight_name="pytorch_model.bin"
    )


def test_pickle_under_the_safetensors_name_in_a_folder(loaded, good_folder, tmp_path, no_unpickling):
    shutil.copyfile(good_folder / CONFIG_NAME, tmp_path / CONFIG_NAME)
    torch.save(loaded.adapter.file_state_dict(), tmp_path / WEIGHTS_NAME)
    refused(loaded, AdapterFileError, ["pickle"], loaded.pipe.load_cpe_adapter, tmp_path)


def test_real_safetensors_starting_with_0x80_is_not_mistaken_for_pickle(tmp_path, loaded):
    """A safetensors header length whose low byte is 0x80 must not look like a pickle's opcode."""
    for extra in range(1024):
        adapter = CPEAdapter.from_state_dict(
            loaded.adapter.file_state_dict(), {**loaded.adapter.config.to_dict(), "name": "n" * extra}
        )
        adapter.save_pretrained(tmp_path / "probe", model_card=False)
        if (tmp_path / "probe" / WEIGHTS_NAME).read_bytes()[0] == 0x80:
            break
    assert (tmp_path / "probe" / WEIGHTS_NAME).read_bytes()[0] == 0x80, "could not build the test file"
    assert CPEAdapter.from_pretrained(tmp_path / "probe").digest() == loaded.adapter.digest()


# ------------------------------------------------------------------------------------- names
def test_unknown_names(loaded, tmp_path):
    pipe = loaded.pipe
    for call in (
        lambda: pipe.set_cpe_adapters(["nope"]),
        lambda: pipe.set_cpe_adapters(["good", "nope"], scales=[1.0, 1.0]),
        lambda: pipe.unload_cpe_adapter("nope"),
        lambda: pipe.unload_cpe_adapter(["good", "nope"]),
        lambda: pipe.get_cpe_adapter("nope"),
        lambda: pipe.save_cpe_adapter(tmp_path, adapter_name="nope"),
    ):
        refused(loaded, CPEAdapterError, ["nope", "good"], call)
    assert not any(tmp_path.iterdir())


def test_unloading_from_a_pipeline_without_adapters_says_what_to_do() -> None:
    with pytest.raises(CPEAdapterError, match=r"no CPE adapters are loaded.*load_cpe_adapter") as info:
        tiny_pipeline("sd").unload_cpe_adapter("vg")
    assert "'vg'" in str(info.value)


def test_the_module_state_dict_is_not_the_file_layout(loaded, good_adapter):
    load, config = loaded.pipe.load_cpe_adapter, good_adapter.config
    words = ["gate_a", "file_state_dict()", "load_file"]
    refused(loaded, CPEAdapterError, words, load, (good_adapter.state_dict(), config), adapter_name="other")
    tensors = good_adapter.file_state_dict()
    tensors["gate.v"] = tensors["gate.v"].T.contiguous()
    words = ["gate.v", "another config", "cpe_config.json"]
    refused(loaded, CPEAdapterError, words, load, (tensors, config), adapter_name="other")


def test_duplicate_name_on_load(loaded, good_folder):
    refused(loaded, CPEAdapterError, ["good", "already loaded"], loaded.pipe.load_cpe_adapter, good_folder, "good")


def test_duplicate_names_in_set(loaded):
    refused(loaded, CPEAdapterError, ["good"], loaded.pipe.set_cpe_adapters, ["good", "good"])


def test_duplicate_names_in_unload(loaded):
    refused(loaded, CPEAdapterError, ["good"], loaded.pipe.unload_cpe_adapter, ["good", "good"])


def test_wrong_number_of_scales(loaded):
    refused(loaded, CPEAdapterError, ["scale"], loaded.pipe.set_cpe_adapters, ["good"], [1.0, 2.0])


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), "1", None])
def test_bad_scale_values(loaded, good_folder, scale):
    refused(loaded, CPEAdapterError, ["scale"], loaded.pipe.set_cpe_adapters, ["good"], [scale])
    refused(loaded, CPEAdapterError, ["scale"], loaded.pipe.load_cpe_adapter, good_folder, "second", scale=scale)


def test_scales_and_names_of_the_wrong_kind(loaded):
    pipe = loaded.pipe
    refused(loaded, CPEAdapterError, ["scales must be a number"], pipe.set_cpe_adapters, ["good"], "0.5")
    refused(loaded, CPEAdapterError, ["adapter_names", "disable_cpe_adapters"], pipe.set_cpe_adapters, None)
    refused(loaded, CPEAdapterError, ["nope"], pipe.set_cpe_adapters, ["good"], {"nope": 1.0})


def test_scales_as_a_mapping_like_peft(loaded):
    pipe = loaded.pipe
    pipe.set_cpe_adapters(["good"], scales={"good": 0.0})
    try:
        plain = unet_output(tiny_pipeline("sd"), loaded.inputs)
        torch.testing.assert_close(unet_output(pipe, loaded.inputs), plain, rtol=0, atol=0)
    finally:
        pipe.set_cpe_adapters(["good"])
    loaded.assert_undisturbed()


def test_a_lora_file_is_named_as_one(loaded, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = tiny_pipeline("sd")
    donor.unet.add_adapter(LoraConfig(r=2, target_modules=["to_k", "to_v"], init_lora_weights=False))
    save_file(
        {f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(donor.unet).items()},
        tmp_path / "x.safetensors",
    )
    refused(
        loaded,
        AdapterFileError,
        ["lora", "load_lora_weights"],
        loaded.pipe.load_cpe_adapter,
        tmp_path / "x.safetensors",
    )


def test_empty_adapter_name(loaded, good_folder):
    refused(loaded, CPEAdapterError, ["adapter_name"], loaded.pipe.load_cpe_adapter, good_folder, "")


# ---------------------------------------------------------------------------------- weights
def _with_nan(adapter: CPEAdapter) -> dict[str, torch.Tensor]:
    tensors = adapter.file_state_dict()
    tensors["gate.v"] = tensors["gate.v"].clone()
    tensors["gate.v"][0, 3] = float("nan")
    return tensors


def test_nan_weights_in_a_file(loaded, good_folder, tmp_path):
    shutil.copyfile(good_folder / CONFIG_NAME, tmp_path / CONFIG_NAME)
    save_file(_with_nan(loaded.adapter), str(tmp_path / WEIGHTS_NAME))
    refused(loaded, AdapterFileError, ["nan", "gate.v"], loaded.pipe.load_cpe_adapter, tmp_path)


def test_nan_weights_in_a_state_dict(loaded):
    source = (_with_nan(loaded.adapter), loaded.adapter.config)
    refused(loaded, AdapterFileError, ["nan"], loaded.pipe.load_cpe_adapter, source)


def test_nan_weights_in_an_adapter_object(loaded):
    adapter = random_adapter(loaded.pipe, seed=4)
    with torch.no_grad():
        adapter.up[0, 0, 5] = float("inf")
    refused(loaded, CPEAdapterError, ["nan or infinite"], loaded.pipe.load_cpe_adapter, adapter, "broken")


def test_state_dict_without_config(loaded):
    refused(loaded, CPEAdapterError, ["config"], loaded.pipe.load_cpe_adapter, loaded.adapter.file_state_dict())


def test_unsupported_source_type(loaded):
    refused(loaded, CPEAdapterError, ["repo id"], loaded.pipe.load_cpe_adapter, 42)


# -------------------------------------------------------------------------------- paths
@pytest.mark.parametrize(
    "kwargs",
    [
        {"weight_name": "../cpe_adapter.safetensors"},
        {"weight_name": "/etc/passwd"},
        {"subfolder": "../good"},
        {"subfolder": "a/../../b"},
        {"weight_name": "..\\x.safetensors"},
    ],
)
def test_paths_leaving_the_adapter_folder(loaded, good_folder, tmp_path, kwargs):
    inner = tmp_path / "inner"
    inner.mkdir()
    shutil.copytree(good_folder, tmp_path / "good")
    shutil.copyfile(good_folder / WEIGHTS_NAME, tmp_path / WEIGHTS_NAME)
    key = next(iter(kwargs))
    refused(loaded, CPEAdapterError, [key, "relative path"], loaded.pipe.load_cpe_adapter, inner, **kwargs)


def test_unsupported_pipeline(loaded):
    class NotAPipeline:
        pass

    refused(loaded, CPEAdapterError, ["unet"], CPEAdapter.for_pipeline, NotAPipeline(), "x")


def test_fused_projections_are_refused_on_every_load(loaded, good_folder):
    """Not only when the first adapter attaches: fusing after that is caught by the next load."""
    loaded.pipe.fuse_qkv_projections()
    try:
        with pytest.raises(CPEAdapterError, match="unfuse_qkv_projections"):
            loaded.pipe.load_cpe_adapter(good_folder, "second")
        assert list(loaded.pipe.list_cpe_adapters()) == ["good"]
        with pytest.raises(ErasureIntegrityError, match="fused") as info:
            unet_output(loaded.pipe, loaded.inputs)
        assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
    finally:
        loaded.pipe.unfuse_qkv_projections()
    loaded.assert_undisturbed()


def test_final_image_still_erased(loaded):
    """After every failure above, a full generation still applies "good" exactly."""
    fresh = tiny_pipeline("sd")
    fresh.load_cpe_adapter(CPEAdapter.from_state_dict(loaded.adapter.file_state_dict(), loaded.adapter.config))
    assert (generate(loaded.pipe) == generate(fresh)).all()


def test_an_adapter_that_overflows_after_a_pipeline_move_is_refused_not_run() -> None:
    pipe = tiny_pipeline("sd")
    adapter = random_adapter(pipe)
    with torch.no_grad():
        adapter.gate_v.mul_(1e6)  # finite in float32, beyond float16's range
    pipe.load_cpe_adapter(adapter, "big")
    pipe.to(torch.float16)
    with pytest.raises(AdapterFileError, match=r"overflows in torch\.float16"):
        generate(pipe)
    pipe.to(torch.float32)
    pipe.unload_cpe_adapter()
    assert bool(torch.isfinite(torch.as_tensor(generate(pipe))).all())
