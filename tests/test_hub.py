"""Hub I/O through the real ``huggingface_hub`` client: an offline pre-populated cache, and
push/download against the fake Hub server of ``tests/fake_hub.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from conftest import generate, populate_hub_cache, random_adapter
from cpe_adapter import AdapterFileError, CPEAdapter, CPEConfig
from cpe_adapter.config import CONFIG_NAME, WEIGHTS_NAME
from cpe_adapter.testing import tiny_pipeline

REPO = "cpe-tests/vg-eraser"
TAGS = {"cpe-adapter", "concept-erasure", "diffusers", "text-to-image"}


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, tuple[CPEAdapter, dict[str, bytes]]]:
    """Two distinct adapters and the bytes of their saved folders."""
    template = tiny_pipeline("sd")
    out = {}
    for name, seed in (("main", 21), ("old", 22)):
        adapter = random_adapter(template, [f"concept {name}"], seed=seed)
        folder = tmp_path_factory.mktemp(name)
        adapter.save_pretrained(folder)
        out[name] = (adapter, folder_files(folder))
    return out


def same_weights(a: CPEAdapter, b: CPEAdapter) -> bool:
    left, right = a.file_state_dict(), b.file_state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


# -------------------------------------------------------------------------- offline Hub cache
def test_repo_id_from_offline_cache_is_bitwise(offline_hub_cache, adapters):
    adapter, files = adapters["main"]
    populate_hub_cache(offline_hub_cache, REPO, files)
    pipe = tiny_pipeline("sd")
    name = pipe.load_cpe_adapter(REPO)
    assert name == "vg-eraser"
    reference = tiny_pipeline("sd")
    reference.load_cpe_adapter(CPEAdapter.from_state_dict(adapter.file_state_dict(), adapter.config))
    np.testing.assert_array_equal(generate(pipe), generate(reference))


def test_subfolder_from_offline_cache(offline_hub_cache, adapters):
    main, main_files = adapters["main"]
    old, old_files = adapters["old"]
    files = {f"erasers/main/{k}": v for k, v in main_files.items()}
    files.update({f"erasers/old/{k}": v for k, v in old_files.items()})
    populate_hub_cache(offline_hub_cache, REPO, files)
    assert same_weights(CPEAdapter.from_pretrained(REPO, subfolder="erasers/old"), old)
    assert same_weights(CPEAdapter.from_pretrained(REPO, subfolder="erasers/main"), main)
    config = CPEConfig.from_pretrained(REPO, subfolder="erasers/old")
    assert config.concept_names == ["concept old"]


def test_revision_from_offline_cache(offline_hub_cache, adapters):
    main, main_files = adapters["main"]
    old, old_files = adapters["old"]
    populate_hub_cache(offline_hub_cache, REPO, main_files)
    sha = "1234567890abcdef1234567890abcdef12345678"
    populate_hub_cache(offline_hub_cache, REPO, old_files, revision=sha)
    pipe = tiny_pipeline("sd")
    at_sha = pipe.load_cpe_adapter(REPO, adapter_name="pinned", revision=sha)
    at_main = pipe.load_cpe_adapter(REPO, adapter_name="latest")
    assert same_weights(pipe.get_cpe_adapter(at_sha), old)
    assert same_weights(pipe.get_cpe_adapter(at_main), main)


def test_weight_name_from_offline_cache(offline_hub_cache, adapters):
    main, main_files = adapters["main"]
    old, old_files = adapters["old"]
    files = dict(main_files)
    files["old-eraser.safetensors"] = old_files[WEIGHTS_NAME]  # lone file: its header holds its config
    del files[CONFIG_NAME]
    populate_hub_cache(offline_hub_cache, REPO, files)
    assert same_weights(CPEAdapter.from_pretrained(REPO, weight_name="old-eraser.safetensors"), old)
    assert same_weights(CPEAdapter.from_pretrained(REPO), main)


def test_cache_dir_argument(tmp_path, offline_hub_cache, adapters):
    main, files = adapters["main"]
    other_cache = tmp_path / "elsewhere"
    populate_hub_cache(other_cache, REPO, files)
    pipe = tiny_pipeline("sd")
    name = pipe.load_cpe_adapter(REPO, cache_dir=other_cache, local_files_only=True)
    assert same_weights(pipe.get_cpe_adapter(name), main)


def test_missing_from_offline_cache(offline_hub_cache, adapters):
    with pytest.raises(AdapterFileError, match="cache") as info:
        tiny_pipeline("sd").load_cpe_adapter("cpe-tests/not-downloaded")
    assert "cpe-tests/not-downloaded" in str(info.value)


def test_missing_subfolder_in_cached_repo(offline_hub_cache, adapters):
    populate_hub_cache(offline_hub_cache, REPO, adapters["main"][1])
    with pytest.raises(AdapterFileError, match=REPO):
        CPEAdapter.from_pretrained(REPO, subfolder="nope")


# ------------------------------------------------------------------------------- fake Hub
def test_push_then_load_by_repo_id(fake_hub, adapters):
    adapter, _ = adapters["main"]
    pipe = tiny_pipeline("sd")
    pipe.load_cpe_adapter(CPEAdapter.from_state_dict(adapter.file_state_dict(), adapter.config), adapter_name="vg")
    repo = "fake-user/vg-eraser"
    url = pipe.push_cpe_adapter_to_hub(repo, commit_message="first eraser")
    assert fake_hub.repo_exists(repo) and fake_hub.resolve(repo) in url
    stored = fake_hub.files(repo)
    assert {"README.md", CONFIG_NAME, WEIGHTS_NAME} <= set(stored)

    fresh = tiny_pipeline("sd")
    name = fresh.load_cpe_adapter(repo)
    assert same_weights(fresh.get_cpe_adapter(name), adapter)
    assert fresh.list_cpe_adapters()[name].weights_sha256 == adapter.digest()
    np.testing.assert_array_equal(generate(fresh), generate(pipe))


def test_pushed_model_card(fake_hub, adapters):
    adapter, _ = adapters["main"]
    repo = "fake-user/card-check"
    CPEAdapter.from_state_dict(adapter.file_state_dict(), adapter.config).push_to_hub(repo)
    card = ModelCard.load(repo)
    assert card.data.library_name == "cpe-adapter"
    assert set(card.data.tags) >= TAGS
    assert "concept main" in card.text
    assert f'load_cpe_adapter("{repo}"' in card.text, "the usage snippet names the repo it was pushed to"
    text = fake_hub.files(repo)["README.md"].decode("utf-8")
    assert text.startswith("---\n")


def test_push_private_and_revision_download(fake_hub, adapters):
    main, _ = adapters["main"]
    old, _ = adapters["old"]
    repo = "fake-user/versions"
    CPEAdapter.from_state_dict(old.file_state_dict(), old.config).push_to_hub(repo, private=True)
    first = fake_hub.resolve(repo)
    CPEAdapter.from_state_dict(main.file_state_dict(), main.config).push_to_hub(repo)
    assert fake_hub.is_private(repo)
    assert same_weights(CPEAdapter.from_pretrained(repo, revision=first), old)
    assert same_weights(CPEAdapter.from_pretrained(repo), main)


def test_missing_repo_on_the_hub(fake_hub):
    with pytest.raises(AdapterFileError, match="fake-user/does-not-exist"):
        CPEAdapter.from_pretrained("fake-user/does-not-exist")


def test_missing_revision_on_the_hub(fake_hub, adapters):
    fake_hub.add_files("fake-user/one", adapters["main"][1])
    with pytest.raises(AdapterFileError, match="revision"):
        CPEAdapter.from_pretrained("fake-user/one", revision="no-such-branch")
