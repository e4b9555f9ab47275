"""Faults: a killed save, a failed download and tampered weights never pass silently.

- Saving is atomic per file (temporary file + rename): a process killed mid-save leaves the old
  file readable and no half-written file under the final name; a save killed between the weights
  and the config leaves a folder that loading refuses loudly instead of mislabelling.
- A failed Hub download raises ``AdapterFileError`` naming the repo and file, leaves nothing
  half-written in the cache, and a retry succeeds.
- Provenance: ``save_pretrained`` records ``weights_sha256`` and ``library_version``;
  :func:`cpe_adapter.provenance.verify_adapter` detects changed weights and a different base model.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import cpe_adapter
from cpe_adapter import CPEAdapter, TargetLayer
from cpe_adapter.config import CONFIG_NAME, WEIGHTS_NAME
from cpe_adapter.errors import AdapterFileError
from cpe_adapter.hub import load_adapter
from cpe_adapter.provenance import verify_adapter
from fake_hub import FakeHub, fake_hub

__all__ = ["fake_hub"]

REPO = "acme/eraser"
CHILD_TIMEOUT = 240  # seconds for a child to reach its kill point; generous for a loaded 2-core CI box


def make_adapter(
    concepts: list[str], seed: int, *, dim: int = 64, layers: int = 8, base: str = "acme/base"
) -> CPEAdapter:
    """A randomly filled adapter (non-zero residual, so tampering changes behaviour)."""
    targets = [TargetLayer(f"block.{i}.attn2.to_{'kv'[i % 2]}", dim, 32 * (1 + i % 3)) for i in range(layers)]
    adapter = CPEAdapter.for_layers(targets, concepts, "names", base_model=base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return adapter


# ---------------------------------------------- saving workers (the killed-save tests are at the end)

BIG = {"dim": 768, "layers": 32}  # ~6 MB of weights: a save takes long enough to be caught mid-way


def save_until_killed(folder: Path, marker: Path, mode: str) -> None:
    """Worker body: save adapter B into ``folder`` stalling at ``os.<mode>``, or save A and B in a loop."""
    versions = [make_adapter(["Van Gogh", "Monet"], 1, **BIG), make_adapter(["Picasso", "Dali"], 2, **BIG)]
    if mode == "loop":
        count = 0
        while True:
            versions[count % 2].save_pretrained(folder)
            count += 1
            marker.write_text(str(count))

    def stall(*args: object, **kwargs: object) -> None:
        marker.write_text(mode)
        time.sleep(600)

    setattr(os, mode, stall)
    versions[1].save_pretrained(folder)


# The zygote imports cpe_adapter once (slow) and forks one worker per scenario (fast). It runs no
# tensor code itself, so forking is safe; the test SIGKILLs the worker and the zygote reports how
# the worker ended.
ZYGOTE = r"""
import os, sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import test_faults

for line in sys.stdin:
    folder, marker, mode = line.rstrip("\n").split("\t")
    pid = os.fork()
    if pid == 0:
        try:
            test_faults.save_until_killed(Path(folder), Path(marker), mode)
        finally:
            os._exit(3)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


class Zygote:
    """A long-lived child that forks saving workers on request."""

    def __init__(self, log: Path) -> None:
        self.log = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, str(Path(__file__).parent)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.strip())

    def _next_line(self) -> str:
        try:
            return self.lines.get(timeout=CHILD_TIMEOUT)
        except queue.Empty:
            pytest.fail(f"the saving child is stuck; its log: {self.log.name}")

    def kill_worker_when(self, folder: Path, mode: str, ready: Callable[[Path], bool], marker: Path) -> None:
        """Fork a worker saving into ``folder`` and SIGKILL it as soon as ``ready(marker)`` holds."""
        marker.unlink(missing_ok=True)
        self.process.stdin.write(f"{folder}\t{marker}\t{mode}\n")
        self.process.stdin.flush()
        pid = int(self._next_line())
        deadline = time.monotonic() + CHILD_TIMEOUT
        while not ready(marker):
            if not self.lines.empty() or time.monotonic() > deadline:
                pytest.fail(f"the saving worker ended or stalled before its kill point; log: {self.log.name}")
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
        assert int(self._next_line()) == -signal.SIGKILL

    def close(self) -> None:
        """Stop the zygote (idle between scenarios, so nothing is lost) and close its log."""
        self.process.stdin.close()
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


@pytest.fixture(scope="module", autouse=True)
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    """Started before the module's first test, so its slow import overlaps the tests that run first."""
    child = Zygote(tmp_path_factory.mktemp("zygote") / "stderr.log")
    try:
        yield child
    finally:
        if child.process.poll() is None:
            child.close()


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """File bytes of the two adapters the child writes (A = Van Gogh/Monet, B = Picasso/Dali), and digests."""
    root = tmp_path_factory.mktemp("versions")
    out: dict[str, dict[str, bytes]] = {}
    for label, adapter in (
        ("A", make_adapter(["Van Gogh", "Monet"], 1, **BIG)),
        ("B", make_adapter(["Picasso", "Dali"], 2, **BIG)),
    ):
        folder = adapter.save_pretrained(root / label)
        out[label] = {name: (folder / name).read_bytes() for name in (WEIGHTS_NAME, CONFIG_NAME)}
        out[label]["digest"] = adapter.digest().encode()
    return out


# ---------------------------------------------------------------------------------- Hub download


def assert_no_half_files(hub_cache: Path, repo_files: dict[str, bytes]) -> None:
    """Every file the cache holds under a final name (not ``.incomplete`` / ``.lock``) is a whole repo file."""
    whole = set(repo_files.values())
    for path in hub_cache.rglob("*"):
        if path.is_file() and "models--" in str(path) and not path.name.endswith((".incomplete", ".lock")):
            if "refs" in path.parts:
                continue
            assert path.read_bytes() in whole, f"{path} is not a complete file of the repo"


@pytest.fixture
def published(fake_hub: FakeHub, tmp_path: Path) -> CPEAdapter:
    adapter = make_adapter(["Van Gogh", "Monet"], 3)
    adapter.save_pretrained(tmp_path / "published")
    fake_hub.add_folder(REPO, tmp_path / "published", lfs=True)
    return adapter


@pytest.mark.parametrize(
    ("fault", "times"),
    [
        ({"mode": "status", "status": 500}, 1),
        ({"mode": "status", "status": 403}, 1),
        ({"mode": "disconnect"}, None),
    ],
)
def test_failed_download_names_repo_and_file_and_a_retry_succeeds(
    fake_hub: FakeHub, published: CPEAdapter, fault: dict, times: int | None
) -> None:
    from huggingface_hub import constants

    hub_cache = Path(constants.HF_HUB_CACHE)
    path = f"/{REPO}/resolve/*/{WEIGHTS_NAME}"
    injected = fake_hub.fail(path, method="GET", times=times, **fault)
    with pytest.raises(AdapterFileError) as caught:
        load_adapter(REPO)
    assert injected.hits >= 1
    assert REPO in str(caught.value) and WEIGHTS_NAME in str(caught.value)
    assert_no_half_files(hub_cache, fake_hub.files(REPO))

    fake_hub.clear_faults()
    assert load_adapter(REPO).digest() == published.digest()
    assert_no_half_files(hub_cache, fake_hub.files(REPO))


def test_truncated_download_is_resumed_never_used_half(fake_hub: FakeHub, published: CPEAdapter) -> None:
    fake_hub.fail(f"/{REPO}/resolve/*/{WEIGHTS_NAME}", method="GET", mode="truncate", times=1)
    assert load_adapter(REPO).digest() == published.digest()


def test_corrupted_cached_file_is_refused_not_loaded(fake_hub: FakeHub, published: CPEAdapter) -> None:
    """Bit rot in the Hub cache (a truncated blob) surfaces as AdapterFileError naming the file."""
    from huggingface_hub import constants

    load_adapter(REPO)
    blob = next(p for p in Path(constants.HF_HUB_CACHE).rglob(WEIGHTS_NAME) if "snapshots" in p.parts).resolve()
    blob.write_bytes(blob.read_bytes()[:-100])
    with pytest.raises(AdapterFileError, match="safetensors"):
        load_adapter(REPO)


# ------------------------------------------------------------------------------------ provenance


def _tamper(weights: Path) -> None:
    """Change one value of ``gate.v`` in place: still a valid file with the same header and config."""
    raw = bytearray(weights.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    start, _ = header["gate.v"]["data_offsets"]
    position = 8 + header_len + start
    (value,) = struct.unpack("<f", raw[position : position + 4])
    raw[position : position + 4] = struct.pack("<f", value + 1.0)
    weights.write_bytes(bytes(raw))


def test_save_records_hash_and_library_version(tmp_path: Path) -> None:
    adapter = make_adapter(["Van Gogh"], 4)
    folder = adapter.save_pretrained(tmp_path / "a")
    config = cpe_adapter.CPEConfig.from_pretrained(folder)
    assert config.weights_sha256 == adapter.digest()
    assert config.library_version == cpe_adapter.__version__
    assert verify_adapter(folder, base_model="acme/base") == []
    assert verify_adapter(load_adapter(folder), base_model="acme/base") == []


def test_tampered_weights_are_detected(tmp_path: Path) -> None:
    folder = make_adapter(["Van Gogh"], 5).save_pretrained(tmp_path / "a")
    _tamper(folder / WEIGHTS_NAME)
    loaded = load_adapter(folder)  # a valid file: loading works, verification must catch it
    warnings = verify_adapter(folder)
    assert len(warnings) == 1 and "weights_sha256" in warnings[0]
    assert verify_adapter(loaded) == warnings


def test_weights_swapped_for_another_adapters_are_detected(tmp_path: Path) -> None:
    """Same concepts and shapes, other values, header copied along: only the hash can tell."""
    first = make_adapter(["Van Gogh"], 6).save_pretrained(tmp_path / "first")
    other = make_adapter(["Van Gogh"], 7)
    other.config = load_adapter(first).config
    cpe_adapter.serialization.save_weights(first / WEIGHTS_NAME, other.file_state_dict(), other.config)
    assert any("weights_sha256" in w for w in verify_adapter(first))


def test_base_model_mismatch_warns(tmp_path: Path) -> None:
    folder = make_adapter(["Van Gogh"], 8, base="acme/base").save_pretrained(tmp_path / "a")
    assert verify_adapter(folder, base_model="acme/base") == []
    warnings = verify_adapter(folder, base_model="other/model")
    assert len(warnings) == 1 and "acme/base" in warnings[0] and "other/model" in warnings[0]
    unknown = make_adapter(["Van Gogh"], 8, base=None).save_pretrained(tmp_path / "b")
    assert any("does not record its base model" in w for w in verify_adapter(unknown, base_model="acme/base"))


def test_unsaved_adapter_has_no_hash_to_check() -> None:
    warnings = verify_adapter(make_adapter(["Van Gogh"], 9))
    assert any("No weights_sha256" in w for w in warnings)


# ------------------------------------------------------------------------------ killed saves


@pytest.mark.parametrize("stall_at", ["fsync", "replace"])
def test_save_killed_mid_write_leaves_the_old_adapter_intact(
    tmp_path: Path, zygote: Zygote, two_versions: dict[str, dict[str, bytes]], stall_at: str
) -> None:
    """Kill the writer after the temp file is written (``fsync``) or complete but not renamed (``replace``)."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        (folder / name).write_bytes(two_versions["A"][name])
    zygote.kill_worker_when(folder, stall_at, Path.exists, tmp_path / "marker")

    assert (folder / WEIGHTS_NAME).read_bytes() == two_versions["A"][WEIGHTS_NAME]
    assert (folder / CONFIG_NAME).read_bytes() == two_versions["A"][CONFIG_NAME]
    leftovers = sorted(p.name for p in folder.iterdir() if p.name not in (WEIGHTS_NAME, CONFIG_NAME))
    assert leftovers and all(name.startswith(".") and name.endswith(".tmp") for name in leftovers)
    assert load_adapter(folder).digest().encode() == two_versions["A"]["digest"]

    make_adapter(["Picasso", "Dali"], 2, **BIG).save_pretrained(folder)
    assert load_adapter(folder).digest().encode() == two_versions["B"]["digest"]


KILL_ROUNDS = 4


def test_save_loop_killed_at_random_moments_never_yields_a_half_file(
    tmp_path: Path, zygote: Zygote, two_versions: dict[str, dict[str, bytes]]
) -> None:
    """Each file is wholly A or wholly B; a folder torn between them is refused, never mislabelled."""
    folder = tmp_path / "adapter"
    digests = (two_versions["A"]["digest"], two_versions["B"]["digest"])
    for _ in range(KILL_ROUNDS):
        delay = random.uniform(0.0, 0.3)
        first_seen: list[float] = []

        def saved_then_waited(marker: Path, delay: float = delay, first_seen: list[float] = first_seen) -> bool:
            if not marker.exists() or not marker.read_text():
                return False
            first_seen[:] = first_seen or [time.monotonic()]
            return time.monotonic() - first_seen[0] >= delay

        zygote.kill_worker_when(folder, "loop", saved_then_waited, tmp_path / "marker")

        weights, config = (folder / WEIGHTS_NAME).read_bytes(), (folder / CONFIG_NAME).read_bytes()
        assert weights in (two_versions["A"][WEIGHTS_NAME], two_versions["B"][WEIGHTS_NAME])
        assert config in (two_versions["A"][CONFIG_NAME], two_versions["B"][CONFIG_NAME])
        torn = (weights == two_versions["A"][WEIGHTS_NAME]) != (config == two_versions["A"][CONFIG_NAME])
        if torn:
            with pytest.raises(AdapterFileError, match="disagree"):
                load_adapter(folder)
        else:
            assert load_adapter(folder).digest().encode() in digests
        assert load_adapter(folder / WEIGHTS_NAME).digest().encode() in digests


def test_saved_files_get_ordinary_permissions(tmp_path: Path) -> None:
    """The temporary file's private 0o600 must not stick: others who can read the folder can read the adapter."""
    (tmp_path / "plain").write_bytes(b"")
    expected = (tmp_path / "plain").stat().st_mode & 0o777
    folder = make_adapter(["Van Gogh"], 1).save_pretrained(tmp_path / "a")
    assert {name: (folder / name).stat().st_mode & 0o777 for name in (WEIGHTS_NAME, CONFIG_NAME, "README.md")} == {
        name: expected for name in (WEIGHTS_NAME, CONFIG_NAME, "README.md")
    }


def test_torn_folder_is_refused_loudly(tmp_path: Path) -> None:
    """Weights of one adapter beside the config of another (same shapes): refused, naming the disagreement."""
    first = make_adapter(["Van Gogh"], 1).save_pretrained(tmp_path / "first")
    second = make_adapter(["Picasso"], 2).save_pretrained(tmp_path / "second")
    (first / WEIGHTS_NAME).write_bytes((second / WEIGHTS_NAME).read_bytes())
    with pytest.raises(AdapterFileError, match="concept_names"):
        load_adapter(first)
