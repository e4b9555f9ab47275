"""Hostile adapter files: every load either returns a valid adapter or raises ``CPEAdapterError``.

Adapters are downloaded from strangers, so ``cpe_config.json`` and ``cpe_adapter.safetensors`` are
untrusted input. Hypothesis mutates a valid adapter (bytes, safetensors header, tensor data,
config) and loads it through the public entry points; each load must

- return a structurally valid adapter or raise :class:`cpe_adapter.errors.CPEAdapterError`
  (never another exception type, never a crash),
- finish within a time bound (hypothesis ``deadline``; a ``SIGALRM`` backstop turns a hang into
  a failure) and grow the process's peak memory by a bounded amount,
- never unpickle or evaluate anything (``pickle``, ``torch.load``, ``eval`` and ``exec`` raise
  during every load).

Budget: ``CPE_FUZZ_PROFILE=ci`` (default, ~150 examples, deterministic) or ``long`` (thousands,
random; run locally, results in ``docs/security.md``).
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import json
import math
import os
import pickle
import re
import resource
import shutil
import signal
import struct
import tempfile
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from cpe_adapter import CPEAdapter, CPEConfig
from cpe_adapter.config import CONFIG_NAME, MAX_PARAMETERS, METADATA_KEY, WEIGHTS_NAME, ConceptSpec, TargetLayer
from cpe_adapter.errors import AdapterFileError, CPEAdapterError
from cpe_adapter.hub import load_adapter
from cpe_adapter.testing import tiny_pipeline
from fake_hub import offline_hub_cache, populate_hub_cache

__all__ = ["offline_hub_cache"]

PROFILE = os.environ.get("CPE_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"CPE_FUZZ_PROFILE must be 'ci' or 'long', got {PROFILE!r}")
# Examples per test are a share of the profile's total: ci ~150 in all, long ~100x that.
SCALE = 1 if PROFILE == "ci" else 100
settings.register_profile(
    "cpe-fuzz-ci",
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.register_profile(
    "cpe-fuzz-long",
    derandomize=False,
    database=None,
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
FUZZ = settings.get_profile(f"cpe-fuzz-{PROFILE}")

HANG_SECONDS = 20  # backstop: a load that runs this long is a hang, not a slow example
PEAK_RSS_BUDGET_MB = 512  # the whole fuzz run may raise the process's peak RSS by at most this
REPO_ID = "fuzz/adapter"
pytestmark = pytest.mark.filterwarnings("ignore:Ignoring unknown CPEConfig keys")

DTYPES = ["F16", "BF16", "F32", "F64", "I8", "U8", "I16", "I32", "I64", "U64", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "?"]
HOSTILE_STRINGS = [
    "",
    " ",
    "..",
    "../../etc/passwd",
    "/etc/passwd",
    "C:\\Windows\\system32",
    "a\x00b",
    "名前",
    "🙂" * 40,
    "gate.A",
    "__metadata__",
    "x" * 5000,
    "\u202e\u0645\u0631\u062d\u0628\u0627",
]
HOSTILE_NUMBERS = [0, -1, 1, 2, 3, 7, 16, 32, 2**31, 2**63, 2**64 + 1, 10**12, 10**30, 1.5, -0.0, 1e308, True, False]
# Every field the config file can hold (read from the dataclass, so new fields are fuzzed too).
CONFIG_KEYS = [f.name for f in dataclasses.fields(CPEConfig)]
CONCEPT_KEYS = [f.name for f in dataclasses.fields(ConceptSpec)]
LAYER_KEYS = [f.name for f in dataclasses.fields(TargetLayer)]


class ForbiddenCall(BaseException):
    """Raised by the patched pickle/eval entry points; a BaseException so no ``except Exception`` hides it."""


class Hang(BaseException):
    """Raised by the SIGALRM backstop when one load runs for ``HANG_SECONDS``."""


# ----------------------------------------------------------------------------------- the original


def _original_files(root: Path) -> tuple[bytes, bytes, CPEAdapter]:
    pipe = tiny_pipeline("sd")
    adapter = CPEAdapter.for_pipeline(pipe, ["Van Gogh", "Monet"], "styles")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in adapter.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    adapter.save_pretrained(root)
    return (root / WEIGHTS_NAME).read_bytes(), (root / CONFIG_NAME).read_bytes(), adapter


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes, CPEAdapter]:
    return _original_files(tmp_path_factory.mktemp("original"))


def split_safetensors(raw: bytes) -> tuple[dict[str, Any], bytes]:
    """Header JSON and data section of a well-formed safetensors file."""
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join_safetensors(header: dict[str, Any], data: bytes, *, align: bool = True) -> bytes:
    """A safetensors file from a header dict and data bytes (no consistency checks: that is the point)."""
    text = json.dumps(header, allow_nan=True).encode()
    if align:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


# --------------------------------------------------------------------------------- guarded loading


@contextlib.contextmanager
def no_code_execution() -> Iterator[list[str]]:
    """Make pickle, torch.load, eval and exec raise; yields the list of forbidden calls attempted."""
    attempts: list[str] = []
    saved = {
        (pickle, "loads"): pickle.loads,
        (pickle, "load"): pickle.load,
        (pickle, "Unpickler"): pickle.Unpickler,
        (torch, "load"): torch.load,
        (builtins, "eval"): builtins.eval,
        (builtins, "exec"): builtins.exec,
    }

    def forbid(name: str) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            attempts.append(name)
            raise ForbiddenCall(f"{name} was called while loading an adapter")

        return refuse

    for (module, name), _ in saved.items():
        setattr(module, name, forbid(f"{module.__name__}.{name}"))
    try:
        yield attempts
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)


@contextlib.contextmanager
def hang_backstop(seconds: int = HANG_SECONDS) -> Iterator[None]:
    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"a load ran for {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@pytest.fixture(scope="module")
def rss_budget() -> Iterator[None]:
    """Fail the module if the fuzz runs raised peak RSS by more than ``PEAK_RSS_BUDGET_MB``."""
    start = peak_rss_mb()
    yield
    grown = peak_rss_mb() - start
    assert grown < PEAK_RSS_BUDGET_MB, f"peak RSS grew by {grown:.0f} MB while loading hostile files"


def assert_valid(adapter: Any) -> None:
    """What "returns a valid adapter" means: a checked config and finite tensors of the implied shapes."""
    assert isinstance(adapter, CPEAdapter)
    config = CPEConfig.from_dict(json.loads(adapter.config.to_json_string()))
    assert config.num_parameters <= MAX_PARAMETERS
    assert {k: tuple(v.shape) for k, v in adapter.file_state_dict().items()} == CPEAdapter.file_shapes(config)
    assert all(torch.isfinite(p).all() for p in adapter.parameters())


def load_guarded(how: str, folder: Path) -> CPEAdapter | CPEAdapterError:
    """Load ``folder`` by ``how``; returns the adapter or the CPEAdapterError, fails on anything else."""
    loaders: dict[str, Callable[[], CPEAdapter]] = {
        "from_pretrained": lambda: CPEAdapter.from_pretrained(folder),
        "load_adapter": lambda: load_adapter(str(folder)),
        "lone_file": lambda: load_adapter(folder / WEIGHTS_NAME),
        "hub": lambda: load_adapter(REPO_ID),
    }
    with no_code_execution() as attempts, hang_backstop():
        try:
            result: CPEAdapter | CPEAdapterError = loaders[how]()
        except CPEAdapterError as err:
            assert str(err).strip(), "errors must say what went wrong"
            result = err
    assert not attempts, f"loading tried to run code: {attempts}"
    if isinstance(result, CPEAdapter):
        assert_valid(result)
    if currently_in_test_context():  # outcome shares in --hypothesis-show-statistics
        event(f"outcome: {'loaded' if isinstance(result, CPEAdapter) else type(result).__name__}")
    return result


def write_and_load(how: str, weights: bytes, config: bytes | None, hub_cache: Path | None = None) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        folder.mkdir()
        (folder / WEIGHTS_NAME).write_bytes(weights)
        if config is not None:
            (folder / CONFIG_NAME).write_bytes(config)
        if how == "hub":
            assert hub_cache is not None
            files = {WEIGHTS_NAME: weights, **({CONFIG_NAME: config} if config is not None else {})}
            populate_hub_cache(hub_cache, REPO_ID, files)
        return load_guarded(how, folder)


LOADERS = st.sampled_from(["from_pretrained", "load_adapter", "lone_file"])


# ------------------------------------------------------------------------------------ byte mutations


@st.composite
def byte_mutations(draw: st.DrawFn, size: int) -> list[tuple[str, int, int]]:
    kinds = st.sampled_from(["truncate", "flip", "insert", "delete", "header_length"])
    return draw(
        st.lists(
            st.tuples(kinds, st.integers(0, size - 1), st.integers(0, 2**64 - 1)),
            min_size=1,
            max_size=4,
        )
    )


def apply_byte_mutations(raw: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(raw)
    for kind, position, value in mutations:
        position = min(position, max(len(data) - 1, 0))
        if kind == "truncate":
            del data[position:]
        elif kind == "flip" and data:
            data[position] ^= (value % 255) + 1
        elif kind == "insert":
            data[position:position] = value.to_bytes(8, "little")[: 1 + value % 8]
        elif kind == "delete":
            del data[position : position + 1 + value % 16]
        elif kind == "header_length":
            data[:8] = value.to_bytes(8, "little")
    return bytes(data)


@settings(FUZZ, max_examples=35 * SCALE)
@given(data=st.data(), how=LOADERS)
def test_mutated_weight_bytes_load_or_fail_cleanly(
    original: tuple[bytes, bytes, CPEAdapter], rss_budget: None, data: st.DataObject, how: str
) -> None:
    weights, config, adapter = original
    mutated = apply_byte_mutations(weights, data.draw(byte_mutations(len(weights))))
    result = write_and_load(how, mutated, config)
    if mutated == weights:
        assert isinstance(result, CPEAdapter) and result.digest() == adapter.digest()


# ---------------------------------------------------------------------------------- header edits


def _absurd_shape() -> st.SearchStrategy[Any]:
    dims = st.sampled_from([0, 1, 2, 10**6, 10**12, 2**63 - 1, 2**64 - 1, -1])
    return st.one_of(
        st.lists(dims, max_size=4),
        st.just([10**12]),
        st.just([10**6, 10**6]),
        st.sampled_from(["32", None, [1.5], [[1]], {"a": 1}]),
    )


def _header_edit(names: list[str]) -> st.SearchStrategy[tuple[Any, ...]]:
    name = st.sampled_from(names)
    offsets = st.tuples(
        st.sampled_from([-1, 0, 1, 8, 2**32, 2**63, 2**64 + 5]), st.sampled_from([0, 4, 2**20, 2**63, -8])
    )
    return st.one_of(
        st.tuples(st.just("dtype"), name, st.sampled_from(DTYPES)),
        st.tuples(st.just("shape"), name, _absurd_shape()),
        st.tuples(st.just("offsets"), name, offsets.map(list)),
        st.tuples(st.just("swap_offsets"), name, name),
        st.tuples(st.just("drop"), name, st.none()),
        st.tuples(st.just("rename"), name, st.sampled_from(HOSTILE_STRINGS)),
        st.tuples(st.just("entry"), name, st.sampled_from([None, 1, "x", [], {"dtype": "F32"}])),
        st.tuples(st.just("metadata"), st.none(), st.sampled_from([None, 1, [], {METADATA_KEY: 5}, {"x": "y"}])),
        st.tuples(st.just("metadata_text"), st.none(), st.sampled_from(["", "{", "[]", "null", '{"concepts": 1}'])),
        st.tuples(st.just("unaligned"), st.none(), st.none()),
    )


def apply_header_edit(header: dict[str, Any], edit: tuple[Any, ...]) -> bool:
    """Apply one edit in place; returns False when the file should be written without 8-byte alignment."""
    kind, name, value = edit
    if name is not None and not isinstance(header.get(name), dict) and kind in ("dtype", "shape", "offsets"):
        return True  # an earlier edit removed or replaced this entry
    if kind == "swap_offsets" and not (isinstance(header.get(name), dict) and isinstance(header.get(value), dict)):
        return True
    if kind == "dtype":
        header[name]["dtype"] = value
    elif kind == "shape":
        header[name]["shape"] = value
    elif kind == "offsets":
        header[name]["data_offsets"] = value
    elif kind == "swap_offsets":
        header[name]["data_offsets"], header[value]["data_offsets"] = (
            header[value].get("data_offsets"),
            header[name].get("data_offsets"),
        )
    elif kind == "drop":
        header.pop(name, None)
    elif kind == "rename" and name in header:
        header[value] = header.pop(name)
    elif kind == "entry":
        header[name] = value
    elif kind == "metadata":
        header["__metadata__"] = value
    elif kind == "metadata_text":
        header["__metadata__"] = {METADATA_KEY: value}
    elif kind == "unaligned":
        return False
    return True


@settings(FUZZ, max_examples=40 * SCALE)
@given(data=st.data(), how=LOADERS)
def test_edited_safetensors_headers_load_or_fail_cleanly(
    original: tuple[bytes, bytes, CPEAdapter], rss_budget: None, data: st.DataObject, how: str
) -> None:
    weights, config, _ = original
    header, body = split_safetensors(weights)
    names = sorted(k for k in header if k != "__metadata__")
    align = True
    for edit in data.draw(st.lists(_header_edit(names), min_size=1, max_size=3)):
        align = apply_header_edit(header, edit) and align
    write_and_load(how, join_safetensors(header, body, align=align), config)


def test_header_claiming_a_terabyte_tensor_is_refused_before_allocating(
    original: tuple[bytes, bytes, CPEAdapter], rss_budget: None
) -> None:
    """A 10^12-element tensor whose offsets agree with its shape: refused from the header alone."""
    weights, config, _ = original
    header, body = split_safetensors(weights)
    header["gate.v"] = {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}
    result = write_and_load("from_pretrained", join_safetensors(header, body), config)
    assert isinstance(result, AdapterFileError)


# ----------------------------------------------------------------------------------- tensor data


@settings(FUZZ, max_examples=15 * SCALE)
@given(
    data=st.data(),
    value=st.sampled_from([math.nan, math.inf, -math.inf]),
    how=LOADERS,
)
def test_non_finite_weights_are_refused(
    original: tuple[bytes, bytes, CPEAdapter], rss_budget: None, data: st.DataObject, value: float, how: str
) -> None:
    """A well-formed file whose tensors hold NaN or inf never yields an adapter (it would erase nothing)."""
    weights, config, _ = original
    header, body = split_safetensors(weights)
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    start, stop = header[name]["data_offsets"]
    index = data.draw(st.integers(0, (stop - start) // 4 - 1))
    body = bytearray(body)
    body[start + 4 * index : start + 4 * index + 4] = struct.pack("<f", value)
    result = write_and_load(how, join_safetensors(header, bytes(body)), config)
    assert isinstance(result, AdapterFileError)
    assert "NaN or infinite" in str(result)


# ---------------------------------------------------------------------------------- config edits

JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(HOSTILE_STRINGS),
    st.sampled_from(HOSTILE_NUMBERS),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
CONFIG_PATHS = st.one_of(
    st.sampled_from(CONFIG_KEYS).map(lambda key: (key,)),
    st.tuples(st.just("concepts"), st.integers(0, 2), st.sampled_from([*CONCEPT_KEYS, "extra"])),
    st.tuples(st.just("target_layers"), st.integers(0, 4), st.sampled_from([*LAYER_KEYS, "x"])),
    st.text(min_size=1, max_size=10).map(lambda key: (key,)),
)


def _config_edit() -> st.SearchStrategy[tuple[Any, ...]]:
    return st.one_of(
        st.tuples(st.just("set"), CONFIG_PATHS, JSON_VALUES),
        st.tuples(st.just("set"), CONFIG_PATHS, st.sampled_from(HOSTILE_STRINGS + HOSTILE_NUMBERS)),
        st.tuples(st.just("delete"), CONFIG_PATHS, st.none()),
        st.tuples(st.just("scale"), st.sampled_from(["text_embed_dim", "gate_rank", "residual_rank"]), st.integers()),
        st.tuples(st.just("many_layers"), st.none(), st.sampled_from([0, 1, 100, 5000])),
    )


def apply_config_edit(config: dict[str, Any], edit: tuple[Any, ...]) -> None:
    kind, path, value = edit
    if kind == "scale":
        if isinstance(config.get(path), int):
            config[path] = config[path] * value
        return
    if kind == "many_layers":
        layer = {"name": "x.attn2.to_k", "in_features": config.get("text_embed_dim"), "out_features": 10**6}
        config["target_layers"] = [{**layer, "name": f"l{i}.attn2.to_k"} for i in range(value)]
        return
    target: Any = config
    for step in path[:-1]:
        if (isinstance(target, dict) and step in target) or (
            isinstance(target, list) and isinstance(step, int) and step < len(target)
        ):
            target = target[step]
        else:
            return
    last = path[-1]
    if kind == "set" and isinstance(target, dict):
        target[last] = value
    elif kind == "delete" and isinstance(target, dict):
        target.pop(last, None)


@pytest.mark.filterwarnings("ignore:Ignoring unknown keys:UserWarning")  # an edit may add a key: the documented outcome
@settings(FUZZ, max_examples=50 * SCALE)
@given(
    edits=st.lists(_config_edit(), min_size=1, max_size=4),
    in_header=st.booleans(),
    config_file=st.booleans(),
    how=st.sampled_from(["from_pretrained", "load_adapter", "lone_file", "hub"]),
)
def test_edited_configs_load_or_fail_cleanly(
    original: tuple[bytes, bytes, CPEAdapter],
    rss_budget: None,
    offline_hub_cache: Path,
    edits: list[tuple[Any, ...]],
    in_header: bool,
    config_file: bool,
    how: str,
) -> None:
    """Edits land in cpe_config.json, in the header's copy, or both, so both readers are fuzzed."""
    weights, config_bytes, _ = original
    config = json.loads(config_bytes)
    for edit in edits:
        apply_config_edit(config, edit)
    text = json.dumps(config, allow_nan=True, ensure_ascii=False)
    if in_header:
        header, body = split_safetensors(weights)
        header["__metadata__"] = {METADATA_KEY: text}
        weights = join_safetensors(header, body)
    result = write_and_load(how, weights, text.encode("utf-8") if config_file else None, offline_hub_cache)
    if isinstance(result, CPEAdapter):
        assert all(isinstance(name, str) and name.strip() for name in result.config.concept_names)


@settings(FUZZ, max_examples=10 * SCALE)
@given(
    mutations=st.lists(
        st.tuples(st.sampled_from(["truncate", "flip", "insert", "delete"]), st.integers(0, 10**6), st.integers()),
        min_size=1,
        max_size=3,
    ),
    how=st.sampled_from(["from_pretrained", "load_adapter"]),
)
def test_corrupted_config_text_loads_or_fails_cleanly(
    original: tuple[bytes, bytes, CPEAdapter], rss_budget: None, mutations: list[tuple[str, int, int]], how: str
) -> None:
    weights, config, _ = original
    mutated = apply_byte_mutations(config, [(k, p, v % 2**64) for k, p, v in mutations])
    write_and_load(how, weights, mutated)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
        ('{"format_version": 99}', "format_version 99"),
        ('{"format_version": -3}', "format_version"),
        ('{"format_version": "1"}', "format_version"),
        ("\udcff", "UTF-8"),
    ],
)
def test_specific_hostile_configs_are_refused_with_a_reason(
    original: tuple[bytes, bytes, CPEAdapter], text: str, message: str
) -> None:
    weights, _, _ = original
    result = write_and_load("from_pretrained", weights, text.encode("utf-8", "surrogateescape"))
    assert isinstance(result, AdapterFileError)
    assert message in str(result)


def test_oversized_config_is_refused_without_reading_it(original: tuple[bytes, bytes, CPEAdapter]) -> None:
    weights, _, _ = original
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / WEIGHTS_NAME).write_bytes(weights)
        with open(folder / CONFIG_NAME, "wb") as handle:
            handle.truncate(64 * 1024 * 1024)  # sparse: no disk or memory used
        result = load_guarded("from_pretrained", folder)
    assert isinstance(result, AdapterFileError)
    assert "bytes" in str(result)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (
            {
                "gate_rank": 10**6,
                "text_embed_dim": 4000,
                "target_layers": [{"name": "a", "in_features": 4000, "out_features": 1}],
            },
            "parameters",
        ),
        ({"alpha": math.inf}, "alpha"),
        ({"residual_rank": -1}, "residual_rank"),
        ({"tie_gate_qk": "yes"}, "tie_gate_qk"),
        ({"concepts": [{"name": 5, "neutral": "a"}]}, "concept name"),
        ({"target_layers": [{"name": "a", "in_features": "32", "out_features": 32}]}, "in_features"),
    ],
)
def test_config_validation_names_the_field(edit: dict[str, Any], fragment: str) -> None:
    """Validation happens on the config alone, before any tensor is allocated or read."""
    base = {
        "concepts": [{"name": "x", "neutral": "y"}],
        "text_embed_dim": 32,
        "target_layers": [{"name": "a", "in_features": 32, "out_features": 32}],
    }
    with pytest.raises(CPEAdapterError, match=fragment):
        CPEConfig.from_dict({**base, **edit})


def test_unknown_keys_from_newer_versions_are_ignored_with_a_warning(original: tuple[bytes, bytes, CPEAdapter]) -> None:
    weights, config, adapter = original
    edited = {**json.loads(config), "from_the_future": {"x": 1}}
    with pytest.warns(UserWarning, match="from_the_future"):
        loaded = write_and_load("from_pretrained", weights, json.dumps(edited).encode())
    assert isinstance(loaded, CPEAdapter) and loaded.digest() == adapter.digest()


def test_config_that_disagrees_with_the_weights_header_is_refused(original: tuple[bytes, bytes, CPEAdapter]) -> None:
    """Same shapes, other concept names: the folder was edited or half-replaced, so refuse to guess."""
    weights, config, _ = original
    edited = json.loads(config)
    edited["concepts"][0]["name"] = "Picasso"
    result = write_and_load("from_pretrained", weights, json.dumps(edited).encode())
    assert isinstance(result, AdapterFileError)
    assert "disagree" in str(result) and "concept_names" in str(result)


# ------------------------------------------------------------------------------- pickle and paths


def test_torch_save_file_is_refused_without_unpickling(
    tmp_path: Path, original: tuple[bytes, bytes, CPEAdapter]
) -> None:
    _, config, adapter = original
    folder = tmp_path / "adapter"
    folder.mkdir()
    torch.save(adapter.file_state_dict(), folder / WEIGHTS_NAME)  # a pickle under the safetensors name
    (folder / CONFIG_NAME).write_bytes(config)
    result = load_guarded("from_pretrained", folder)
    assert isinstance(result, AdapterFileError)
    assert "pickle" in str(result)
    with no_code_execution() as attempts, pytest.raises(AdapterFileError, match="pickle"):
        load_adapter(folder, weight_name="adapter_model.bin")
    assert not attempts


def test_library_source_never_unpickles_or_evaluates() -> None:
    """A static guard: the package has no pickle/torch.load/eval/exec/trust_remote_code call sites."""
    forbidden = re.compile(
        r"\bpickle\.(load|loads|Unpickler)\b|\btorch\.load\(|(?<![.\w])eval\(|(?<![.\w])exec\(|trust_remote_code"
    )
    package = Path(__import__("cpe_adapter").__file__).parent
    hits = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if forbidden.search(line)
    ]
    assert hits == []


@pytest.fixture
def canary_layout(tmp_path: Path, original: tuple[bytes, bytes, CPEAdapter]) -> Path:
    """``root/adapter/sub/`` (an adapter folder) next to ``root/outside/`` holding a "canary" adapter."""
    weights, config, adapter = original
    root = tmp_path / "root"
    (root / "adapter" / "sub").mkdir(parents=True)
    for folder in (root / "adapter", root / "adapter" / "sub"):
        (folder / WEIGHTS_NAME).write_bytes(weights)
        (folder / CONFIG_NAME).write_bytes(config)
    canary = CPEAdapter.from_state_dict(
        adapter.file_state_dict(),
        {
            **adapter.config.to_dict(),
            "concepts": [{"name": "canary", "neutral": "c"}, {"name": "bird", "neutral": "b"}],
        },
    )
    canary.save_pretrained(root / "outside")
    return root


@pytest.mark.parametrize(
    ("weight_name", "subfolder"),
    [
        ("../outside/cpe_adapter.safetensors", None),
        ("../../outside/cpe_adapter.safetensors", "sub"),
        (None, ".."),
        (None, "../outside"),
        (None, "sub/../../outside"),
        ("cpe_adapter.safetensors", "/tmp"),
        ("C:/x/cpe_adapter.safetensors", None),
        ("..\\outside\\cpe_adapter.safetensors", None),
    ],
)
def test_weight_name_and_subfolder_cannot_leave_the_folder(
    canary_layout: Path, weight_name: str | None, subfolder: str | None
) -> None:
    with pytest.raises(CPEAdapterError, match="relative path inside"):
        load_adapter(canary_layout / "adapter", weight_name=weight_name, subfolder=subfolder)


@settings(FUZZ, max_examples=10 * SCALE)
@given(
    weight_name=st.one_of(st.none(), st.sampled_from(HOSTILE_STRINGS), st.text(max_size=40)),
    subfolder=st.one_of(st.none(), st.sampled_from([*HOSTILE_STRINGS, "sub", "sub/..", "./sub"]), st.text(max_size=20)),
)
def test_no_weight_name_or_subfolder_reaches_a_file_outside(
    canary_layout: Path, weight_name: str | None, subfolder: str | None
) -> None:
    with no_code_execution() as attempts, hang_backstop():
        try:
            loaded = load_adapter(canary_layout / "adapter", weight_name=weight_name, subfolder=subfolder)
        except CPEAdapterError:
            return
    assert not attempts
    assert loaded.config.concept_names == ["Van Gogh", "Monet"]


@pytest.mark.parametrize("linked", [WEIGHTS_NAME, CONFIG_NAME, "sub"])
def test_symlinks_pointing_outside_the_folder_are_refused(canary_layout: Path, linked: str) -> None:
    folder = canary_layout / "adapter"
    target = canary_layout / "outside" / (linked if linked != "sub" else "")
    victim = folder / linked
    if victim.is_dir():
        shutil.rmtree(victim)
    else:
        victim.unlink()
    victim.symlink_to(target.resolve())
    with pytest.raises(AdapterFileError, match="outside the adapter folder"):
        load_adapter(folder, subfolder="sub" if linked == "sub" else None)


def test_symlinks_inside_the_folder_are_followed(canary_layout: Path) -> None:
    folder = canary_layout / "adapter"
    (folder / WEIGHTS_NAME).unlink()
    (folder / WEIGHTS_NAME).symlink_to(Path("sub") / WEIGHTS_NAME)
    assert load_adapter(folder).config.concept_names == ["Van Gogh", "Monet"]
