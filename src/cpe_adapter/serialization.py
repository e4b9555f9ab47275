"""Safe, atomic reading and writing of adapter files (safetensors only, never pickle)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .config import MAX_CONFIG_BYTES, METADATA_KEY, CPEConfig
from .errors import AdapterFileError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# A safetensors header is a little-endian u64 length followed by that much JSON.
MAX_HEADER_BYTES = 100 * 1024 * 1024


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import (os.umask can only be read by setting it, which is not thread-safe later):
# saved files get the permissions a plain open() would give them, not mkstemp's private 0o600.
FILE_MODE = 0o666 & ~_current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A reader sees either the old file or the new one, never half of it; an interrupted write
    leaves only a ``.tmp`` file that is not the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_weights(path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: CPEConfig) -> None:
    """Save ``tensors`` as safetensors with the config JSON in the header metadata, atomically."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(contiguous, metadata={METADATA_KEY: config.to_json_string()}))


def refuse_pickle(path: str | os.PathLike) -> None:
    """Raise a clear error for files that would need unpickling to read."""
    path = Path(path)
    head, size = b"", 0
    if path.is_file():
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(9)
    # A safetensors file starts with its header length (u64, little-endian) and then "{"; its first
    # byte may be 0x80 like a pickle's, so only content that is not a plausible header counts.
    header_like = head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8
    looks_pickled = not header_like and (head[:1] == b"\x80" or head[:4] == b"PK\x03\x04")
    if path.suffix.lower() in PICKLE_SUFFIXES or looks_pickled:
        raise AdapterFileError(
            f"{path.name} looks like a pickle/torch.save file. cpe-adapter reads only .safetensors weights "
            "(pickle files can run arbitrary code). Convert it with safetensors.torch.save_file first."
        )


def read_config_text(path: str | os.PathLike) -> str:
    """The text of a ``cpe_config.json``, refusing oversized or non-UTF-8 files before decoding them."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise AdapterFileError(
            f"{path} is {size:,} bytes; a cpe_config.json has a few kB. The file is corrupt or not an adapter config."
        )
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise AdapterFileError(f"{path} is not UTF-8 text; the config file is corrupt.") from err


def _check_header(path: Path) -> None:
    size = path.stat().st_size
    if size < 8:
        raise AdapterFileError(f"{path} is truncated ({size} bytes); re-download or re-save the adapter.")
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
    if header_len > min(MAX_HEADER_BYTES, size - 8):
        raise AdapterFileError(
            f"{path} has a corrupt safetensors header (claims {header_len} bytes, file has {size}); "
            "re-download or re-save the adapter."
        )


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors header metadata of ``path`` (no tensor data is read)."""
    path = Path(path)
    refuse_pickle(path)
    _check_header(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{path} is not a valid .safetensors file ({err}); re-download or re-save it.") from err


def load_weights(
    path: str | os.PathLike, expected_shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, torch.Tensor]:
    """Load all tensors of a safetensors file on the CPU.

    With ``expected_shapes``, the header is checked first (names, shapes, float dtypes), so a file
    that claims absurd sizes is refused before any tensor is read.
    """
    path = Path(path)
    refuse_pickle(path)
    _check_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
            if expected_shapes is not None:
                _check_layout(path, handle, keys, expected_shapes)
            return {key: handle.get_tensor(key) for key in keys}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise AdapterFileError(f"{path} is not a valid .safetensors file ({err}); re-download or re-save it.") from err


def _check_layout(path: Path, handle, keys: list[str], expected: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(keys))
    extra = sorted(set(keys) - set(expected))
    if missing or extra:
        raise AdapterFileError(
            f"{path.name} does not match its config: missing tensors {missing[:5]}, unexpected tensors "
            f"{extra[:5]}. The weights and cpe_config.json belong to different adapters."
        )
    for key in keys:
        piece = handle.get_slice(key)
        shape = tuple(piece.get_shape())
        if shape != tuple(expected[key]):
            raise AdapterFileError(
                f"Tensor {key!r} in {path.name} has shape {list(shape)}, the config expects "
                f"{list(expected[key])}. The file is corrupt or belongs to another adapter."
            )
        dtype = piece.get_dtype()
        if dtype not in ("F16", "BF16", "F32", "F64"):
            raise AdapterFileError(f"Tensor {key!r} in {path.name} has dtype {dtype}; adapters hold float tensors.")


def config_from_metadata(metadata: dict[str, str], source: str) -> CPEConfig:
    """The :class:`CPEConfig` stored in a safetensors header, or a clear error if there is none."""
    text = metadata.get(METADATA_KEY)
    if text is None:
        if _looks_like_lora(source):
            raise AdapterFileError(
                f"{source} holds LoRA weights (its tensor names contain 'lora'), not a CPE adapter; load it with "
                "`pipe.load_lora_weights(...)`. LoRAs and CPE erasers can be active together."
            )
        raise AdapterFileError(
            f"{source} carries no '{METADATA_KEY}' metadata and no cpe_config.json was found beside it; "
            "pass the folder that holds both files, or (state_dict, config)."
        )
    return CPEConfig.from_json_string(text, source=f"the '{METADATA_KEY}' metadata of {source}")


def _looks_like_lora(source: str) -> bool:
    """Whether the safetensors file ``source`` holds LoRA factors (diffusers / PEFT / kohya names)."""
    try:
        with safe_open(source, framework="pt") as handle:
            return any("lora" in key.lower() for key in handle.keys())  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError):
        return False
