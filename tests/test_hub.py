"""Hub I/O through the real ``huggingface_hub`` client: an offline pre-populated cache, and
push/download against the fake Hub server of ``tests/fake_hub.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download

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


# --------------------------------------------------------------- cache layouts and file choice
def test_snapshot_folder_of_the_hub_cache_loads(offline_hub_cache, adapters):
    """``snapshot_download`` folders link every file into the repo's blobs/: those links are its own."""
    from huggingface_hub import snapshot_download

    main, files = adapters["main"]
    populate_hub_cache(offline_hub_cache, REPO, files)
    folder = Path(snapshot_download(REPO, local_files_only=True))
    assert (folder / WEIGHTS_NAME).is_symlink(), "the cache links snapshot files to blobs"
    assert same_weights(CPEAdapter.from_pretrained(folder), main)
    assert CPEConfig.from_pretrained(folder).concept_names == ["concept main"]


def test_link_out_of_a_plain_folder_is_still_refused(tmp_path, adapters):
    _, files = adapters["main"]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / WEIGHTS_NAME).write_bytes(files[WEIGHTS_NAME])
    folder = tmp_path / "blobs" / "snapshots" / "abc"  # looks like a cache path, is not in one
    folder.mkdir(parents=True)
    (folder / CONFIG_NAME).write_bytes(files[CONFIG_NAME])
    (folder / WEIGHTS_NAME).symlink_to(outside / WEIGHTS_NAME)
    with pytest.raises(AdapterFileError, match="outside the adapter folder"):
        CPEAdapter.from_pretrained(folder)
    lookalike = tmp_path / "x" / "snapshots" / "abc"  # a snapshots/ beside a blobs/, but no models--* repo
    lookalike.mkdir(parents=True)
    (tmp_path / "x" / "blobs").mkdir()
    (tmp_path / "x" / "blobs" / "w").write_bytes(files[WEIGHTS_NAME])
    (lookalike / CONFIG_NAME).write_bytes(files[CONFIG_NAME])
    (lookalike / WEIGHTS_NAME).symlink_to(tmp_path / "x" / "blobs" / "w")
    with pytest.raises(AdapterFileError, match="outside the adapter folder"):
        CPEAdapter.from_pretrained(lookalike)


def test_weight_name_is_described_by_its_own_header_beside_another_config(offline_hub_cache, adapters):
    """A repo's cpe_config.json describes its default weights, not a second file chosen by weight_name."""
    main, main_files = adapters["main"]
    old, old_files = adapters["old"]
    files = dict(main_files)
    files["old-eraser.safetensors"] = old_files[WEIGHTS_NAME]
    files[f"erasers/old/{WEIGHTS_NAME}"] = old_files[WEIGHTS_NAME]
    populate_hub_cache(offline_hub_cache, REPO, files)
    assert same_weights(CPEAdapter.from_pretrained(REPO, weight_name="old-eraser.safetensors"), old)
    assert same_weights(CPEAdapter.from_pretrained(REPO, weight_name=f"erasers/old/{WEIGHTS_NAME}"), old)
    assert same_weights(CPEAdapter.from_pretrained(REPO), main)
    assert CPEConfig.from_pretrained(REPO, weight_name="old-eraser.safetensors").concept_names == ["concept old"]


def test_config_file_path_and_folder_without_config(tmp_path, adapters):
    main, files = adapters["main"]
    folder = tmp_path / "ad"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    pipe = tiny_pipeline("sd")
    assert pipe.load_cpe_adapter(folder / CONFIG_NAME) == "ad", "cpe_config.json stands for its folder"
    assert same_weights(pipe.get_cpe_adapter("ad"), main)
    (folder / CONFIG_NAME).unlink()
    assert CPEConfig.from_pretrained(folder).concept_names == ["concept main"], "the header describes the file"


def test_force_download_replaces_a_corrupt_cached_file(fake_hub, adapters):
    adapter, _ = adapters["main"]
    repo = "fake-user/corrupt"
    CPEAdapter.from_state_dict(adapter.file_state_dict(), adapter.config).push_to_hub(repo)
    path = Path(hf_hub_download(repo, WEIGHTS_NAME)).resolve()
    path.write_bytes(path.read_bytes()[:100])  # a killed copy, a disk error
    with pytest.raises(AdapterFileError, match="force_download=True"):
        CPEAdapter.from_pretrained(repo)
    assert same_weights(CPEAdapter.from_pretrained(repo, force_download=True), adapter)
    assert same_weights(CPEAdapter.from_pretrained(repo), adapter), "the cache now holds a good copy"
    path.write_bytes(path.read_bytes()[:100])
    pipe = tiny_pipeline("sd")
    name = pipe.load_cpe_adapter(repo, force_download=True)  # the pipeline loader passes it on
    assert same_weights(pipe.get_cpe_adapter(name), adapter)


def test_unusable_cache_dir_is_named(fake_hub, adapters, tmp_path):
    adapter, _ = adapters["main"]
    CPEAdapter.from_state_dict(adapter.file_state_dict(), adapter.config).push_to_hub("fake-user/c")
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("")
    with pytest.raises(AdapterFileError, match="writable folder") as info:
        CPEAdapter.from_pretrained("fake-user/c", cache_dir=not_a_folder)
    assert str(not_a_folder) in str(info.value)


# ------------------------------------------------------------------------------ saving, pushing
def test_non_finite_adapter_is_never_saved_or_pushed(fake_hub, adapters, tmp_path):
    adapter, _ = adapters["main"]
    broken = CPEAdapter.from_state_dict(adapter.file_state_dict(), adapter.config)
    with torch.no_grad():
        broken.up[0, 0, 0] = float("nan")
    with pytest.raises(AdapterFileError, match="NaN"):
        broken.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing is written, not even the folder"
    with pytest.raises(AdapterFileError, match="NaN"):
        broken.push_to_hub("fake-user/broken")
    assert not fake_hub.repo_exists("fake-user/broken")
    assert broken.config.weights_sha256 == adapter.config.weights_sha256, "a refused save leaves the config"


def test_pickle_serialization_is_refused(adapters, tmp_path):
    adapter, _ = adapters["main"]
    with pytest.raises(ValueError, match="safetensors"):
        adapter.save_pretrained(tmp_path / "x", safe_serialization=False)
    assert not (tmp_path / "x").exists()


def test_push_to_a_bare_name_lands_in_the_user_namespace(fake_hub, adapters):
    adapter, _ = adapters["main"]
    url = CPEAdapter.from_state_dict(adapter.file_state_dict(), adapter.config).push_to_hub("bare-eraser")
    assert "fake-user/bare-eraser" in url
    assert {CONFIG_NAME, WEIGHTS_NAME, "README.md"} <= set(fake_hub.files("fake-user/bare-eraser"))
    assert 'load_cpe_adapter("fake-user/bare-eraser"' in fake_hub.files("fake-user/bare-eraser")["README.md"].decode()
    assert same_weights(CPEAdapter.from_pretrained("fake-user/bare-eraser"), adapter)


def test_push_to_a_new_branch(fake_hub, adapters):
    main, _ = adapters["main"]
    old, _ = adapters["old"]
    pipe = tiny_pipeline("sd")
    pipe.load_cpe_adapter(CPEAdapter.from_state_dict(main.file_state_dict(), main.config), adapter_name="vg")
    pipe.push_cpe_adapter_to_hub("fake-user/from-pipe", revision="v3")  # the pipeline method passes it on
    assert set(fake_hub.branches("fake-user/from-pipe")) == {"main", "v3"}
    repo = "fake-user/branches"
    CPEAdapter.from_state_dict(old.file_state_dict(), old.config).push_to_hub(repo)
    CPEAdapter.from_state_dict(main.file_state_dict(), main.config).push_to_hub(repo, revision="v2")
    assert set(fake_hub.branches(repo)) == {"main", "v2"}
    assert same_weights(CPEAdapter.from_pretrained(repo), old)
    assert same_weights(CPEAdapter.from_pretrained(repo, revision="v2"), main)
    fresh = "fake-user/new-with-branch"
    CPEAdapter.from_state_dict(main.file_state_dict(), main.config).push_to_hub(fresh, revision="dev")
    assert same_weights(CPEAdapter.from_pretrained(fresh, revision="dev"), main)


def test_pushing_again_keeps_what_the_author_wrote_on_the_card(fake_hub, adapters):
    main, _ = adapters["main"]
    old, _ = adapters["old"]
    repo = "fake-user/authored"
    CPEAdapter.from_state_dict(old.file_state_dict(), old.config).push_to_hub(repo)
    card = ModelCard.load(repo)
    card.data.license = "creativeml-openrail-m"
    card.text = "\n# Limitations\n\nOnly tested on SD 1.5.\n" + card.text
    HfApi().upload_file(path_or_fileobj=str(card).encode(), path_in_repo="README.md", repo_id=repo)
    CPEAdapter.from_state_dict(main.file_state_dict(), main.config).push_to_hub(repo)
    renewed = ModelCard.load(repo)
    assert renewed.data.license == "creativeml-openrail-m"
    assert "Only tested on SD 1.5." in renewed.text
    assert "concept main" in renewed.text and "concept old" not in renewed.text, "the generated part is renewed"
    assert renewed.text.count("# CPE concept eraser") == 1


def test_saving_into_a_folder_keeps_its_readme_outside_the_generated_part(adapters, tmp_path):
    main, _ = adapters["main"]
    old, _ = adapters["old"]
    folder = CPEAdapter.from_state_dict(old.file_state_dict(), old.config).save_pretrained(tmp_path / "ad")
    readme = folder / "README.md"
    readme.write_text(readme.read_text() + "\n## Notes\n\nKeep me.\n")
    CPEAdapter.from_state_dict(main.file_state_dict(), main.config).save_pretrained(folder)
    text = readme.read_text()
    assert "Keep me." in text and "concept main" in text and "concept old" not in text


def test_card_names_no_local_base_model_and_no_license(adapters, tmp_path, monkeypatch):
    from cpe_adapter.model_card import model_card

    main, _ = adapters["main"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "sd15").mkdir(parents=True)
    local = CPEConfig.from_dict({**main.config.to_dict(), "base_model": "models/sd15"})
    card = model_card(local, "fake-user/x")
    assert card.data.base_model is None and card.data.license is None
    assert 'from_pretrained("models/sd15")' not in card.text
    hub = CPEConfig.from_dict({**main.config.to_dict(), "base_model": "org/base"})
    assert model_card(hub).data.base_model == "org/base"


def test_private_push_to_an_existing_public_repo_warns(fake_hub, adapters):
    adapter, _ = adapters["main"]
    copy = CPEAdapter.from_state_dict(adapter.file_state_dict(), adapter.config)
    copy.push_to_hub("fake-user/public")
    with pytest.warns(UserWarning, match="already exists and is public"):
        copy.push_to_hub("fake-user/public", private=True)
    assert not fake_hub.is_private("fake-user/public")
    copy.push_to_hub("fake-user/new-private", private=True)
    assert fake_hub.is_private("fake-user/new-private")


@pytest.mark.parametrize(
    "readme",
    [
        "---\nA horizontal rule, not front matter\n---\n\nNotes the author wrote.\n",
        "---\nlicense: [unclosed\n---\n\nNotes the author wrote.\n",
        "Notes the author wrote, no front matter at all.\n",
    ],
)
def test_any_existing_readme_is_kept_and_the_save_completes(adapters, tmp_path, readme):
    main, _ = adapters["main"]
    folder = tmp_path / "ad"
    folder.mkdir()
    (folder / "README.md").write_text(readme)
    saved = CPEAdapter.from_state_dict(main.file_state_dict(), main.config)
    saved.save_pretrained(folder)
    card = ModelCard.load(folder / "README.md")
    assert "Notes the author wrote" in card.text and "concept main" in card.text
    assert card.data.library_name == "cpe-adapter"
    assert saved.config.weights_sha256 == main.digest()


def test_a_card_of_the_earlier_version_loses_the_license_and_local_base_it_claimed(adapters, tmp_path, monkeypatch):
    main, _ = adapters["main"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "sd").mkdir(parents=True)
    config = CPEConfig.from_dict({**main.config.to_dict(), "base_model": "models/sd"})
    old = "---\nlibrary_name: cpe-adapter\nlicense: apache-2.0\nbase_model: models/sd\n---\n\n# CPE concept eraser: x\n"
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "README.md").write_text(old)
    CPEAdapter.from_state_dict(main.file_state_dict(), config).save_pretrained(tmp_path / "ad")
    card = ModelCard.load(tmp_path / "ad" / "README.md")
    assert card.data.license is None and card.data.base_model is None
    assert card.text.count("# CPE concept eraser") == 1


def test_config_of_a_chosen_file_without_a_header_copy_is_the_folders(adapters, tmp_path):
    from safetensors.torch import save_file

    main, files = adapters["main"]
    folder = tmp_path / "ad"
    folder.mkdir()
    (folder / CONFIG_NAME).write_bytes(files[CONFIG_NAME])
    save_file(main.file_state_dict(), folder / "bare.safetensors")  # no config in its header
    assert CPEConfig.from_pretrained(folder, weight_name="bare.safetensors").concept_names == ["concept main"]
    assert same_weights(CPEAdapter.from_pretrained(folder, weight_name="bare.safetensors"), main)
