"""Tests for the local fake Hub (``tests/fake_hub.py``) driven by the real ``huggingface_hub`` client."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants, hf_api, hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

from fake_hub import (
    UNREACHABLE_ENDPOINT,
    FakeHub,
    configure_hf_endpoint,
    fake_hub,
    git_blob_oid,
    offline_hub_cache,
    populate_hub_cache,
)

# The HTTP client of the installed huggingface_hub: httpx2 from 2.0 on, httpx before.
try:
    import httpx2 as http_client
except ImportError:
    import httpx as http_client

__all__ = ["fake_hub", "offline_hub_cache"]

REPO = "acme/tiny-adapter"


def _read_tree(root: str | Path) -> dict[str, bytes]:
    root = Path(root)
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def test_fixture_points_huggingface_hub_at_the_fake(fake_hub: FakeHub) -> None:
    assert fake_hub.url == constants.ENDPOINT == hf_api.api.endpoint == HfApi().endpoint
    assert hf_hub_url(REPO, "a.txt").startswith(f"{fake_hub.url}/{REPO}/resolve/main/")
    assert os.environ["HF_ENDPOINT"] == fake_hub.url
    assert not constants.HF_HUB_OFFLINE
    assert constants.HF_HUB_DISABLE_TELEMETRY
    assert Path(constants.HF_HUB_CACHE) == Path(os.environ["HF_HOME"]) / "hub"


def test_configure_hf_endpoint_is_undone_with_the_monkeypatch() -> None:
    before = (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, hf_api.api.endpoint)
    with pytest.MonkeyPatch.context() as monkeypatch:
        configure_hf_endpoint(monkeypatch, UNREACHABLE_ENDPOINT)
        assert hf_hub_url(REPO, "a.txt") == f"{UNREACHABLE_ENDPOINT}/{REPO}/resolve/main/a.txt"
    assert (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, hf_api.api.endpoint) == before


def test_hf_hub_download_returns_the_file_content(fake_hub: FakeHub) -> None:
    fake_hub.add_file(REPO, "config.json", b'{"rank": 4}')

    path = hf_hub_download(REPO, "config.json")

    assert Path(path).read_bytes() == b'{"rank": 4}'
    assert ("HEAD", f"/{REPO}/resolve/main/config.json") in fake_hub.requests
    assert Path(path).resolve().name == git_blob_oid(b'{"rank": 4}')


def test_hf_hub_download_with_subfolder_branch_and_commit_sha(fake_hub: FakeHub) -> None:
    first = fake_hub.add_file(REPO, "weights/adapter.bin", b"v1")
    fake_hub.add_file(REPO, "weights/adapter.bin", b"v2", revision="feature/x")
    second = fake_hub.add_file(REPO, "weights/adapter.bin", b"v3")

    def download(revision: str) -> bytes:
        return Path(hf_hub_download(REPO, "adapter.bin", subfolder="weights", revision=revision)).read_bytes()

    assert download("main") == b"v3"
    assert download("feature/x") == b"v2"
    assert download(first) == b"v1"
    assert download(second) == b"v3"
    assert download(fake_hub.resolve(REPO, "feature/x")) == b"v2"
    assert ("HEAD", f"/{REPO}/resolve/feature%2Fx/weights/adapter.bin") in fake_hub.requests


def test_lfs_files_are_described_with_linked_etag(fake_hub: FakeHub) -> None:
    data = b"\x00" * 1000
    fake_hub.add_file(REPO, "adapter.safetensors", data, lfs=True)

    path = Path(hf_hub_download(REPO, "adapter.safetensors"))
    (entry,) = HfApi().list_repo_tree(REPO)

    assert path.read_bytes() == data
    assert path.resolve().name == entry.lfs.sha256
    assert entry.lfs.size == 1000


def test_snapshot_download_fetches_every_file_including_nested_ones(fake_hub: FakeHub) -> None:
    files = {"a.txt": b"a", "sub/b.txt": b"b", "sub/deeper/c.bin": b"c" * 100}
    sha = fake_hub.add_files(REPO, files)

    folder = snapshot_download(REPO)

    assert Path(folder).name == sha
    assert _read_tree(folder) == files
    assert sorted(HfApi().list_repo_files(REPO)) == sorted(files)
    top_level = {entry.path for entry in HfApi().list_repo_tree(REPO)}
    assert top_level == {"a.txt", "sub"}


def test_missing_file_revision_and_repo_raise_the_hub_errors(fake_hub: FakeHub) -> None:
    fake_hub.add_file(REPO, "config.json", b"{}")

    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("acme/no-such-repo", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("acme/no-such-repo")


def test_create_repo_and_upload_folder_round_trip(fake_hub: FakeHub, tmp_path: Path) -> None:
    source = tmp_path / "adapter"
    (source / "nested").mkdir(parents=True)
    (source / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Adapter\n")
    (source / "adapter_config.json").write_text('{"rank": 8}')
    (source / "nested" / "weights.bin").write_bytes(b"\x01\x02\x03")
    api = HfApi(token="hf_secret")

    url = api.create_repo("acme/uploaded", private=True, repo_type="model")
    api.create_repo("acme/uploaded", private=True, exist_ok=True)
    info = api.upload_folder(repo_id="acme/uploaded", folder_path=source, commit_message="Upload adapter")
    folder = snapshot_download("acme/uploaded")

    downloaded = _read_tree(folder)
    assert url.repo_id == "acme/uploaded"
    assert info.oid == fake_hub.resolve("acme/uploaded")
    assert downloaded == fake_hub.files("acme/uploaded")
    assert downloaded.pop(".gitattributes").startswith(b"*.bin")
    assert downloaded == _read_tree(source)
    assert fake_hub.is_private("acme/uploaded")
    assert api.model_info("acme/uploaded").private is True
    assert "Bearer hf_secret" in fake_hub.authorizations
    assert fake_hub.unhandled == []


def test_second_upload_makes_a_new_commit_and_keeps_the_old_one(fake_hub: FakeHub) -> None:
    api = HfApi(token="hf_secret")
    api.create_repo(REPO)

    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="adapter.bin", repo_id=REPO).oid
    second = api.upload_file(path_or_fileobj=b"v2", path_in_repo="adapter.bin", repo_id=REPO).oid

    assert first != second
    assert fake_hub.history(REPO)[:2] == [second, first]
    assert Path(hf_hub_download(REPO, "adapter.bin")).read_bytes() == b"v2"
    assert Path(hf_hub_download(REPO, "adapter.bin", revision=first)).read_bytes() == b"v1"
    assert api.model_info(REPO, revision=first).sha == first


def test_private_repos_can_require_a_token(fake_hub: FakeHub) -> None:
    fake_hub.require_auth_for_private = True
    fake_hub.create_repo(REPO, private=True)
    fake_hub.add_file(REPO, "config.json", b"{}")

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "config.json")

    assert Path(hf_hub_download(REPO, "config.json", token="hf_reader")).read_bytes() == b"{}"
    assert fake_hub.authorizations[-1] == "Bearer hf_reader"


@pytest.fixture
def offline_outside_the_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_fake_hub_turns_offline_mode_off(offline_outside_the_fixture: None, fake_hub: FakeHub) -> None:
    fake_hub.add_file(REPO, "config.json", b"{}")

    assert Path(hf_hub_download(REPO, "config.json")).read_bytes() == b"{}"
    assert os.environ["HF_HUB_OFFLINE"] == "0"


def test_injected_status_error_reaches_the_client(fake_hub: FakeHub) -> None:
    fake_hub.add_file(REPO, "config.json", b"{}")
    fault = fake_hub.fail(f"/api/models/{REPO}", status=500, times=1)

    with pytest.raises(HfHubHTTPError) as error:
        HfApi().model_info(REPO)

    assert error.value.response.status_code == 500
    assert fault.hits == 1
    assert HfApi().model_info(REPO).sha == fake_hub.resolve(REPO)


def test_disconnect_fault_drops_the_connection_without_an_answer(fake_hub: FakeHub) -> None:
    fake_hub.add_file(REPO, "config.json", b"{}")
    fake_hub.fail(f"/api/models/{REPO}", mode="disconnect", times=1)

    with pytest.raises(http_client.RemoteProtocolError):
        HfApi().model_info(REPO)

    assert HfApi().model_info(REPO).sha == fake_hub.resolve(REPO)


def test_truncated_download_is_resumed_with_a_range_request(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)
    data = bytes(range(256)) * 40
    fake_hub.add_file(REPO, "adapter.bin", data)
    fake_hub.fail(f"/{REPO}/resolve/*/adapter.bin", mode="truncate", method="GET", times=1)

    path = hf_hub_download(REPO, "adapter.bin")

    assert Path(path).read_bytes() == data
    ranges = [record.headers.get("range") for record in fake_hub.records if record.method == "GET"]
    assert ranges == [None, f"bytes={len(data) // 2}-"]


def test_unknown_endpoints_get_a_clear_404_and_are_logged(fake_hub: FakeHub) -> None:
    response = get_session().get(f"{fake_hub.url}/api/spaces-hardware")

    assert response.status_code == 404
    assert "no route for GET /api/spaces-hardware" in response.json()["error"]
    assert fake_hub.unhandled == [("GET", "/api/spaces-hardware")]


def test_fake_hub_runs_standalone_with_an_explicit_endpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub = FakeHub()
    with pytest.raises(RuntimeError):
        _ = hub.url

    with hub:
        hub.add_file("acme/standalone", "a.txt", "hello")
        path = hf_hub_download("acme/standalone", "a.txt", endpoint=hub.url, cache_dir=tmp_path, token=False)
        assert Path(path).read_text() == "hello"

    with pytest.raises(http_client.ConnectError):
        get_session().get(f"{hub.url}/api/models/acme/standalone")


def test_offline_cache_serves_downloads_without_a_server(offline_hub_cache: Path) -> None:
    files = {"adapter_config.json": b'{"rank": 2}', "weights/adapter.bin": b"\x00\x01"}
    sha = populate_hub_cache(offline_hub_cache, REPO, files)

    config = hf_hub_download(REPO, "adapter_config.json")
    weights = hf_hub_download(REPO, "adapter.bin", subfolder="weights", revision=sha)
    folder = snapshot_download(REPO)

    assert constants.HF_HUB_OFFLINE
    assert Path(config).read_bytes() == b'{"rank": 2}'
    assert Path(weights).read_bytes() == b"\x00\x01"
    assert _read_tree(folder) == files
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(REPO, "missing.json")
