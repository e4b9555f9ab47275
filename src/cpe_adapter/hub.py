"""Finding, reading, saving and pushing adapter files (local folders, single files, the Hub).

Hub access goes through ``huggingface_hub`` (``hf_hub_download``, ``HfApi.upload_folder``,
``ModelCard``), so caching, revisions, tokens and offline mode behave as everywhere else.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import HfApi, errors, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .adapter import CPEAdapter
from .config import CONFIG_NAME, METADATA_KEY, WEIGHTS_NAME, CPEConfig, config_json
from .errors import AdapterFileError, CPEAdapterError
from .serialization import (
    PICKLE_SUFFIXES,
    atomic_write_bytes,
    config_from_metadata,
    load_weights,
    read_config_text,
    read_metadata,
    save_weights,
)

# Transport failures (connection reset, truncated body after the client's own retries): the HTTP
# library's base error where huggingface_hub exports it, OSError otherwise (requests-based versions).
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (getattr(errors, "HTTPError", OSError), OSError)

HUB_KWARGS = ("subfolder", "revision", "token", "cache_dir", "local_files_only", "force_download", "weight_name")
# Errors of the local file system (the cache folder), not of the connection.
FILESYSTEM_ERRORS = (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)


def _safe_relative(value: str | None, what: str) -> str | None:
    """Reject ``weight_name`` / ``subfolder`` values that could leave the adapter folder."""
    if value is None or value == "":
        return None
    path = PurePosixPath(str(value).replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or str(value).startswith(("/", "\\")) or ":" in str(value):
        raise CPEAdapterError(f"{what}={value!r} must be a relative path inside the adapter folder or repo.")
    return str(path)


def resolve_file(
    source: str | os.PathLike,
    filename: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    force_download: bool = False,
    required: bool = True,
) -> Path | None:
    """Local path of ``filename`` in a folder or Hub repo (downloaded through the Hub cache)."""
    if not str(source).strip():  # Path("") is the working directory: never what was meant
        raise AdapterFileError("The adapter source is an empty path; pass a Hub repo id, a folder or a file.")
    filename = _safe_relative(filename, "weight_name") or WEIGHTS_NAME
    subfolder = _safe_relative(subfolder, "subfolder")
    local = adapter_source(source)
    if _probe(local, Path.is_file):
        return local
    if _probe(local, Path.is_dir):
        path = local / (subfolder or "") / filename
        if _probe(path, Path.is_file):
            _check_inside(path, local)
            return path
        if required:
            raise AdapterFileError(f"No {filename} in {local / (subfolder or '')}; is this a cpe-adapter folder?")
        return None
    text = str(source)
    if text.startswith((".", "/", "~", "\\")) or text.count("/") > 1 or "\\" in text:
        raise AdapterFileError(f"{source} does not exist (it is neither a folder, a file nor a Hub repo id).")
    try:
        return Path(
            hf_hub_download(
                str(source),
                filename,
                subfolder=subfolder,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=bool(local_files_only),
                force_download=bool(force_download),
            )
        )
    except LocalEntryNotFoundError as err:
        # Before EntryNotFoundError, its base class: "offline" must not read as "no such file".
        if not required:
            return None
        raise AdapterFileError(
            f"{filename!r} of {source!r} is not in the local Hub cache and cannot be downloaded (offline or "
            f"local_files_only). Connect, or download it first with `huggingface-cli download {source}`."
        ) from err
    except EntryNotFoundError as err:
        if not required:
            return None
        raise AdapterFileError(f"The Hub repo {source!r} has no file {filename!r} (subfolder={subfolder!r}).") from err
    except RevisionNotFoundError as err:
        raise AdapterFileError(f"The Hub repo {source!r} has no revision {revision!r}.") from err
    except RepositoryNotFoundError as err:
        raise AdapterFileError(
            f"{source!r} is neither a local path nor an accessible Hub repo (missing, private without a token, "
            "or misspelled)."
        ) from err
    except HFValidationError as err:
        raise AdapterFileError(
            f"{source!r} is neither an existing local path nor a valid Hub repo id ({err})."
        ) from err
    except FILESYSTEM_ERRORS as err:
        where = cache_dir or "the Hub cache (HF_HUB_CACHE)"
        raise AdapterFileError(
            f"Could not write {filename!r} of {source!r} into {where}: {err}. Point cache_dir (or HF_HUB_CACHE) "
            "at a writable folder."
        ) from err
    except (HfHubHTTPError, *TRANSPORT_ERRORS) as err:
        raise AdapterFileError(
            f"Downloading {filename!r} from the Hub repo {source!r} failed: {err}. Retry when the connection works (an "
            "interrupted download is resumed, never used half-written)."
        ) from err


def adapter_source(source: str | os.PathLike) -> Path:
    """``source`` as a path; a ``cpe_config.json`` inside an adapter folder stands for the folder."""
    path = Path(source)
    if path.name == CONFIG_NAME and _probe(path, Path.is_file):
        return path.parent
    return path


def is_local(source: Any) -> bool:
    """Whether ``source`` names an existing local file or folder (rather than a Hub repo)."""
    return isinstance(source, (str, os.PathLike)) and bool(str(source).strip()) and _probe(Path(source), Path.exists)


def _probe(path: Path, test: Any) -> bool:
    """``path.is_file()`` / ``is_dir()`` that answers False for names the OS refuses (too long, NUL bytes)."""
    try:
        return bool(test(path))
    except (OSError, ValueError):
        return False


def _check_inside(path: Path, folder: Path) -> None:
    """Refuse a file that resolves (through symlinks) outside ``folder``: adapters read only their own files.

    A snapshot folder of the Hub cache (``models--org--name/snapshots/<commit>/``, e.g. from
    ``snapshot_download``) links every file to the repo's own ``blobs/`` folder; those links are its own.
    """
    resolved, root = path.resolve(), folder.resolve()
    roots = [root]
    for parent in (root, *root.parents):
        if parent.parent.name == "snapshots" and parent.parent.parent.name.startswith(("models--", "datasets--")):
            roots.append(parent.parent.parent / "blobs")
            break
    if not any(resolved.is_relative_to(allowed) for allowed in roots):
        raise AdapterFileError(
            f"{path} resolves to {resolved}, outside the adapter folder {root}. Copy the file into the folder "
            "instead of linking to it."
        )


def load_adapter(
    source: Any,
    *,
    weight_name: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    force_download: bool = False,
) -> CPEAdapter:
    """Read an adapter from any accepted source (see ``load_cpe_adapter``); nothing is attached.

    The config is ``cpe_config.json`` beside the default weights file (checked against the copy in
    the file's header); a file chosen with ``weight_name``, or a lone file, is described by its own
    header copy (``cpe_config.json`` may belong to another adapter of the same folder or repo).
    """
    if isinstance(source, CPEAdapter):
        source.check_finite(
            "contains NaN or infinite values; the adapter is broken (check its training run) and would turn every "
            "erased image into NaN."
        )
        return source
    if isinstance(source, (tuple, list)) and len(source) == 2 and isinstance(source[0], dict):
        state_dict, config = source
        return CPEAdapter.from_state_dict(state_dict, config)
    if isinstance(source, dict):
        raise CPEAdapterError("Pass a state dict together with its config: `(state_dict, config)`.")
    if not isinstance(source, (str, os.PathLike)):
        raise CPEAdapterError(
            f"Cannot load a CPE adapter from a {type(source).__name__}; pass a Hub repo id, a folder, a "
            ".safetensors file, (state_dict, config) or a CPEAdapter."
        )
    name = str(weight_name or source)
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise AdapterFileError(
            f"{name} is a pickle file; cpe-adapter reads only .safetensors weights (pickle can run arbitrary code)."
        )
    hub = {"subfolder": subfolder, "revision": revision, "token": token, "cache_dir": cache_dir}
    hub.update(local_files_only=local_files_only, force_download=force_download)
    weights = resolve_file(source, weight_name or WEIGHTS_NAME, **hub)
    lone = _probe(adapter_source(source), Path.is_file)
    config_path = None if lone else resolve_file(source, CONFIG_NAME, required=False, **hub)
    try:
        metadata = read_metadata(weights)
        if weight_name not in (None, WEIGHTS_NAME) and METADATA_KEY in metadata:
            config_path = None
        if config_path is not None:
            config = CPEConfig.from_json_string(read_config_text(config_path))
            _check_header_agrees(config, metadata, weights)
        else:
            config = config_from_metadata(metadata, str(weights))
        tensors = load_weights(weights, CPEAdapter.file_shapes(config))
    except AdapterFileError as err:
        if is_local(source):
            raise
        raise AdapterFileError(f"{err} To replace the cached copy, load again with force_download=True.") from err
    return CPEAdapter.from_state_dict(tensors, config)


# Fields that decide what the weights compute and what they are said to erase, and the weights'
# hash: cpe_config.json and the header copy must agree on them (a save torn between the two files,
# or a hand edit of one, is refused even when the two adapters have the same structure).
STRUCTURAL_FIELDS = (
    "concept_names",
    "concepts",
    "weights_sha256",
    "text_embed_dim",
    "target_layers",
    "gate_rank",
    "residual_rank",
    "alpha",
    "tie_gate_qk",
)


def _check_header_agrees(config: CPEConfig, metadata: dict[str, str], weights: Path) -> None:
    """Refuse a folder whose ``cpe_config.json`` describes other weights than the file's own header copy.

    A mismatch means an edited or half-replaced folder (e.g. a save interrupted between the two
    files): which concepts the weights erase is then unknown, so loading fails instead of guessing.
    """
    if METADATA_KEY not in metadata:
        return
    header = config_from_metadata(metadata, str(weights))
    differing = [key for key in STRUCTURAL_FIELDS if getattr(header, key) != getattr(config, key)]
    if differing:
        raise AdapterFileError(
            f"{CONFIG_NAME} and the config inside {weights.name} disagree on {differing}; the folder was edited "
            "or only partly replaced. Re-save the adapter, or re-download it."
        )


def save_adapter_folder(
    adapter: CPEAdapter,
    save_directory: str | os.PathLike,
    *,
    model_card: bool = True,
    repo_id: str | None = None,
) -> Path:
    """Write weights (with the config in their header), ``cpe_config.json`` and a model card.

    ``repo_id``: the Hub repo the folder is for, so the card's usage snippet loads from it. A
    ``README.md`` already in the folder keeps what its author wrote outside the generated part.
    Everything is checked before the folder is touched, and the adapter's config takes the new hash
    only once every file is written.
    """
    from . import __version__

    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():
        raise CPEAdapterError(f"{folder} exists and is not a folder.")
    if folder.suffix.lower() in (".safetensors", ".json", ".bin"):
        raise CPEAdapterError(
            f"{folder} names a file, but an adapter is saved as a folder ({WEIGHTS_NAME}, {CONFIG_NAME} and a "
            f"model card); pass a folder such as {folder.with_suffix('')}."
        )
    adapter.check_finite(
        "contains NaN or infinite values; nothing was saved (loading would refuse the files). Check the training run."
    )
    tensors = adapter.file_state_dict()
    config = CPEConfig.from_dict(
        {**adapter.config.to_dict(), "library_version": __version__, "weights_sha256": adapter.digest()}
    )
    # built first: a card that cannot be written must not leave half a folder
    card = _folder_card(folder, config, repo_id) if model_card else None
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder / WEIGHTS_NAME, tensors, config)
    config.save_pretrained(folder)
    if card is not None:
        atomic_write_bytes(folder / "README.md", card)
    adapter.config = config
    return folder


def record_evaluation(folder: str | os.PathLike, figures: dict[str, Any]) -> None:
    """Set ``evaluation`` in a saved folder's ``cpe_config.json`` to ``figures`` and renew its model card.

    Only those two files change: the weights file keeps its bytes and dtype (its header copy of the
    config differs only in this non-structural field), and every other key of the JSON stays as it
    is, also one a newer version wrote. Both files are built before either is written.
    """
    folder = Path(folder)
    data = json.loads(read_config_text(folder / CONFIG_NAME))
    data["evaluation"] = figures
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # loading the folder has already warned about unknown keys
        config = CPEConfig.from_dict(data)  # checks the new figures, as every config is checked
    card = _folder_card(folder, config, None)
    atomic_write_bytes(folder / "README.md", card)
    atomic_write_bytes(folder / CONFIG_NAME, (config_json(data) + "\n").encode("utf-8"))


def _folder_card(folder: Path, config: CPEConfig, repo_id: str | None) -> bytes:
    """The model card for ``config`` in ``folder``, keeping what the author wrote in a ``README.md``
    already there."""
    from .model_card import model_card as build_model_card

    readme = folder / "README.md"
    existing = readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else None
    return str(build_model_card(config, repo_id, existing)).encode("utf-8")


def push_adapter(
    source: CPEAdapter | str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
) -> str:
    """Upload an adapter to ``repo_id`` (created if needed); returns the commit URL.

    ``source`` is a :class:`CPEAdapter` (saved to a temporary folder, so a refused adapter leaves
    nothing on the Hub; the repo's card keeps everything outside its generated part) or a saved
    folder, uploaded as it is with its own card. A folder must load, and its weights must match
    the hash its config records: one whose weights changed after saving is refused rather than
    given a fresh hash on the Hub.
    """
    hub = {"private": private, "token": token, "commit_message": commit_message, "revision": revision}
    if isinstance(source, CPEAdapter):
        with tempfile.TemporaryDirectory() as tmp:
            save_adapter_folder(source, tmp, model_card=False)
            return _upload(Path(tmp), repo_id, source.config, **hub)
    folder = Path(source)
    adapter = load_unchanged_folder(folder)
    return _upload(folder, repo_id, adapter.config, **hub, folder_card=True)


def load_unchanged_folder(folder: Path) -> CPEAdapter:
    """The adapter saved in ``folder``, refused when its weights no longer match the hash its config
    records (changed after saving): publishing or re-describing it would vouch for unknown weights."""
    from .provenance import verify_adapter

    adapter = load_adapter(folder)
    recorded = adapter.config.weights_sha256
    if recorded is not None and recorded != adapter.digest():
        raise AdapterFileError(
            f"{folder}: {verify_adapter(adapter)[0]} Re-save it with save_pretrained if the change is yours."
        )
    return adapter


def _upload(
    folder: Path,
    repo_id: str,
    config: CPEConfig,
    *,
    private: bool | None,
    token: str | bool | None,
    commit_message: str | None,
    revision: str | None,
    folder_card: bool = False,
) -> str:
    """Create the repo (and branch), then commit ``folder``'s adapter files and a card in one commit.

    The card renews the generated part of the folder's ``README.md`` (``folder_card``) or else of
    the repo's current one; what their authors wrote around it is kept.
    """
    from huggingface_hub import CommitOperationAdd

    from .model_card import model_card

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    if private and not api.model_info(repo_id).private:
        warnings.warn(
            f"{repo_id} already exists and is public: private=True only applies to a new repo, so this upload is "
            "public. Change the repo's visibility on the Hub (or push to a new repo) to keep it private.",
            stacklevel=3,
        )
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    readme = folder / "README.md"
    existing = readme.read_text(encoding="utf-8", errors="replace") if folder_card and readme.is_file() else None
    if existing is None:
        existing = _hub_card(repo_id, revision, token)
    card = str(model_card(config, repo_id, existing)).encode("utf-8")
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
        for name in (WEIGHTS_NAME, CONFIG_NAME)
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    info = api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or f"Upload CPE adapter ({', '.join(config.concept_names)})",
        revision=revision,
    )
    return str(getattr(info, "commit_url", info))


def _hub_card(repo_id: str, revision: str | None, token: str | bool | None) -> str | None:
    """The text of the repo's current ``README.md``, or None when it has none."""
    try:
        path = hf_hub_download(repo_id, "README.md", revision=revision, token=token)
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, LocalEntryNotFoundError):
        return None
    return Path(path).read_text(encoding="utf-8", errors="replace")
