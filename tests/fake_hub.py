"""A local fake of the Hugging Face Hub HTTP API, for tests.

The real ``huggingface_hub`` client is left untouched: only the server is fake. `FakeHub` keeps repos in
memory and serves them from a ``ThreadingHTTPServer`` on 127.0.0.1, implementing the endpoints that
downloads (``hf_hub_download``, ``snapshot_download``), repo metadata (``model_info``,
``list_repo_files``, ``list_repo_tree``) and uploads (``create_repo``, ``upload_file``,
``upload_folder``) use, with the request and response formats of ``huggingface_hub`` 2.4.

Pytest fixtures:

- ``fake_hub``: a running `FakeHub` with ``huggingface_hub`` pointed at it (``HF_ENDPOINT`` and every
  copy of the endpoint taken at import time) and a private, online ``HF_HOME``.
- ``offline_hub_cache``: a private, empty Hub cache with ``HF_HUB_OFFLINE=1``; fill it with
  `populate_hub_cache`.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

logger = logging.getLogger(__name__)

REPO_TYPES = ("model", "dataset", "space")
# Endpoint used by `offline_hub_cache`: nothing listens on the discard port, so a request that slips
# past offline mode fails fast instead of reaching the internet.
UNREACHABLE_ENDPOINT = "http://127.0.0.1:9"

_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_PLURAL_TO_TYPE = {"models": "model", "datasets": "dataset", "spaces": "space"}
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_SHORT_SHA = re.compile(r"[0-9a-f]{7,40}")
_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)

FaultMode = Literal["status", "truncate", "disconnect"]


def git_blob_oid(data: bytes) -> str:
    """Git blob id of ``data``: the oid and ETag the Hub reports for a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _repo_folder_name(repo_id: str, repo_type: str) -> str:
    return "--".join([f"{repo_type}s", *repo_id.split("/")])


@dataclass(frozen=True)
class _StoredFile:
    """File content at one commit; ``lfs`` files are described the way the Hub describes LFS files."""

    data: bytes
    lfs: bool = False

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def pointer(self) -> bytes:
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n"
        ).encode()

    @cached_property
    def oid(self) -> str:
        return git_blob_oid(self.pointer if self.lfs else self.data)

    def tree_entry(self, path: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": self.oid, "size": len(self.data), "path": path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(self.pointer)}
        return entry


@dataclass
class _Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, _StoredFile]
    date: datetime


@dataclass
class _Repo:
    repo_id: str
    repo_type: str
    private: bool
    created_at: datetime
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)
    next_pr: int = 1


@dataclass(frozen=True)
class RecordedRequest:
    """One request received by the fake Hub.

    ``path`` is the path as sent on the wire (percent-encoded, without the query string) and ``headers``
    has lower-cased names.
    """

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None

    def flag(self, name: str) -> bool:
        return (self.param(name) or "").lower() in {"1", "true", "yes"}

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


@dataclass
class Fault:
    """An injected failure for requests whose wire path matches ``pattern`` (an `fnmatch` glob).

    Modes: ``"status"`` answers ``status`` with an error body, ``"truncate"`` sends the normal headers
    (full ``Content-Length``) but only half of the body then closes the connection, ``"disconnect"``
    closes the connection without answering. ``times=None`` fails forever.
    """

    pattern: str
    status: int = 500
    mode: FaultMode = "status"
    method: str | None = None
    times: int | None = None
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (
            (self.times is None or self.hits < self.times)
            and (self.method is None or self.method == method)
            and fnmatch.fnmatchcase(path, self.pattern)
        )


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json_response(payload: Any, status: int = 200) -> _Response:
    return _Response(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})


class _HubError(Exception):
    """An error answered the way the Hub answers it (JSON body, ``X-Error-Code`` header)."""

    def __init__(
        self, status: int, message: str, code: str | None = None, *, payload: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers: dict[str, str] = {}
        self.payload = payload or {}

    def response(self) -> _Response:
        response = _json_response({"error": self.message, **self.payload}, self.status)
        response.headers["X-Error-Message"] = self.message.encode("ascii", "backslashreplace").decode()
        if self.code is not None:
            response.headers["X-Error-Code"] = self.code
        response.headers.update(self.headers)
        return response


def _ranged(data: bytes, range_header: str | None, headers: dict[str, str]) -> _Response:
    """Serve ``data`` honouring a single ``bytes=start-[end]`` range, as resumed downloads send."""
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header or "")
    if match is None:
        return _Response(200, data, headers)
    start = int(match[1])
    end = min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
    if start > end:
        error = _HubError(416, "Requested range not satisfiable")
        error.headers["Content-Range"] = f"bytes */{len(data)}"
        raise error
    return _Response(206, data[start : end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"})


_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_API_REPO = r"/api/(?P<type>models|datasets|spaces)/" + _REPO
_RESOLVE = re.compile(rf"^/(?:(?P<type>datasets|spaces)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")

_Endpoint = Callable[["FakeHub", re.Match[str], RecordedRequest], _Response]


class FakeHub:
    """In-memory Hub repos served over HTTP on 127.0.0.1.

    Pre-populate with `add_file` / `add_files` / `add_folder`, inspect with `files`, `resolve`,
    `history` and `is_private`, and assert on traffic with `requests` / `records` / `unhandled`.
    Any token is accepted; with ``require_auth_for_private`` a private repo is only visible to requests
    that carry an ``Authorization`` header.
    """

    def __init__(self, *, user: str = "fake-user", require_auth_for_private: bool = False) -> None:
        self.user = user
        self.require_auth_for_private = require_auth_for_private
        self.records: list[RecordedRequest] = []
        self.unhandled: list[tuple[str, str]] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._faults: list[Fault] = []
        self._lock = threading.RLock()
        self._sequence = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._url: str | None = None

    # Lifecycle

    def start(self) -> FakeHub:
        """Start serving on a free port of 127.0.0.1 in a daemon thread."""
        if self._server is not None:
            raise RuntimeError("FakeHub is already running")
        self._server = _Server(self)
        host, port = self._server.server_address[:2]
        self._url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the server and close the connections it still holds open."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL of the server, e.g. ``http://127.0.0.1:54321`` (use it as ``HF_ENDPOINT``)."""
        if self._url is None:
            raise RuntimeError("FakeHub has not been started")
        return self._url

    # Repos

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False) -> None:
        """Create an empty repo (one empty initial commit on ``main``)."""
        self._create_repo(repo_id, repo_type, private, {})

    def add_file(
        self,
        repo_id: str,
        path: str,
        data: bytes | str,
        revision: str = "main",
        *,
        repo_type: str = "model",
        lfs: bool = False,
    ) -> str:
        """Commit one file to branch ``revision`` (created if needed); returns the new commit sha."""
        return self.add_files(repo_id, {path: data}, revision, repo_type=repo_type, lfs=lfs)

    def add_files(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str],
        revision: str = "main",
        *,
        repo_type: str = "model",
        lfs: bool = False,
        message: str = "Add files",
    ) -> str:
        """Commit ``files`` ({path_in_repo: content}) in one commit; returns the new commit sha.

        The repo is created (public) if it does not exist, and the branch is created from ``main`` if it
        does not exist. ``lfs=True`` makes the Hub describe the files as LFS files (``X-Linked-Etag``,
        ``lfs`` in tree listings).
        """
        if _COMMIT_SHA.fullmatch(revision):
            raise ValueError(f"revision must be a branch name, not a commit sha: {revision}")
        with self._lock:
            repo = self._repos.get((repo_type, repo_id)) or self._create_repo(repo_id, repo_type, False, {})
            if revision not in repo.branches:
                repo.branches[revision] = repo.branches["main"]
            head = repo.commits[repo.branches[revision]]
            new_files = dict(head.files)
            new_files.update({path: _StoredFile(_as_bytes(data), lfs) for path, data in files.items()})
            return self._new_commit(repo, revision, new_files, message).sha

    def add_folder(
        self,
        repo_id: str,
        folder: str | os.PathLike[str],
        revision: str = "main",
        *,
        path_in_repo: str = "",
        repo_type: str = "model",
        lfs: bool = False,
    ) -> str:
        """Commit every file under ``folder`` (recursively) in one commit; returns the new commit sha."""
        root = Path(folder)
        prefix = f"{path_in_repo.strip('/')}/" if path_in_repo.strip("/") else ""
        files = {
            prefix + file.relative_to(root).as_posix(): file.read_bytes()
            for file in sorted(root.rglob("*"))
            if file.is_file()
        }
        return self.add_files(repo_id, files, revision, repo_type=repo_type, lfs=lfs)

    def files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict[str, bytes]:
        """Content of every file of the repo at ``revision`` (branch name or commit sha)."""
        with self._lock:
            commit = self._get_commit(self._require_repo(repo_id, repo_type), revision)
            return {path: stored.data for path, stored in commit.files.items()}

    def resolve(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> str:
        """Commit sha that ``revision`` points to."""
        with self._lock:
            return self._get_commit(self._require_repo(repo_id, repo_type), revision).sha

    def history(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> list[str]:
        """Commit shas reachable from ``revision``, newest first."""
        with self._lock:
            repo = self._require_repo(repo_id, repo_type)
            commit: _Commit | None = self._get_commit(repo, revision)
            shas = []
            while commit is not None:
                shas.append(commit.sha)
                commit = repo.commits[commit.parent] if commit.parent else None
            return shas

    def branches(self, repo_id: str, *, repo_type: str = "model") -> dict[str, str]:
        """Branch name to commit sha."""
        with self._lock:
            return dict(self._require_repo(repo_id, repo_type).branches)

    def is_private(self, repo_id: str, *, repo_type: str = "model") -> bool:
        with self._lock:
            return self._require_repo(repo_id, repo_type).private

    def repo_exists(self, repo_id: str, *, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    # Faults and request log

    def fail(
        self,
        pattern: str,
        *,
        status: int = 500,
        mode: FaultMode = "status",
        method: str | None = None,
        times: int | None = None,
    ) -> Fault:
        """Inject a failure for requests whose wire path matches ``pattern``; see `Fault`.

        Example: ``hub.fail("/acme/model/resolve/*/weights.bin", mode="truncate", method="GET", times=1)``.
        Note that the client retries some failures with a backoff of several seconds (e.g. 5xx on the
        HEAD of ``hf_hub_download`` once no cached copy exists): use ``times`` to keep tests fast.
        """
        fault = Fault(pattern, status=status, mode=mode, method=method, times=times)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, wire path) of every request received, in order."""
        with self._lock:
            return [(record.method, record.path) for record in self.records]

    @property
    def authorizations(self) -> list[str | None]:
        """``Authorization`` header of every request received (None when absent), in order."""
        with self._lock:
            return [record.authorization for record in self.records]

    def clear_log(self) -> None:
        with self._lock:
            self.records.clear()
            self.unhandled.clear()

    # Store internals (callers hold the lock)

    def _create_repo(self, repo_id: str, repo_type: str, private: bool, files: dict[str, _StoredFile]) -> _Repo:
        if repo_type not in REPO_TYPES:
            raise ValueError(f"Unknown repo type: {repo_type}")
        if (repo_type, repo_id) in self._repos:
            raise ValueError(f"Repo already exists: {repo_type} {repo_id}")
        repo = _Repo(repo_id, repo_type, private, datetime.now(timezone.utc))
        self._repos[(repo_type, repo_id)] = repo
        self._new_commit(repo, "main", files, "initial commit")
        return repo

    def _new_commit(self, repo: _Repo, branch: str, files: dict[str, _StoredFile], message: str) -> _Commit:
        parent = repo.branches.get(branch)
        self._sequence += 1
        digest = hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}\n{parent}\n{self._sequence}\n{message}\n".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].oid}\n".encode())
        commit = _Commit(digest.hexdigest(), parent, message, files, datetime.now(timezone.utc))
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        return commit

    def _require_repo(self, repo_id: str, repo_type: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise KeyError(f"No such repo in FakeHub: {repo_type} {repo_id}")
        return repo

    def _get_commit(self, repo: _Repo, revision: str) -> _Commit:
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        if _SHORT_SHA.fullmatch(revision):
            candidates = [sha for sha in repo.commits if sha.startswith(revision)]
            if len(candidates) == 1:
                return repo.commits[candidates[0]]
        raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _repo_url(self, repo: _Repo) -> str:
        return f"{self.url}/{_URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    # HTTP side

    def _process(self, request: RecordedRequest) -> tuple[_Response | None, FaultMode | None]:
        """Record ``request`` and build its response; None means: close without answering."""
        with self._lock:
            self.records.append(request)
            fault = next((f for f in self._faults if f.matches(request.method, request.path)), None)
            if fault is not None:
                fault.hits += 1
        if fault is not None and fault.mode == "disconnect":
            return None, fault.mode
        if fault is not None and fault.mode == "status":
            message = f"FakeHub: injected failure for {request.method} {request.path}"
            return _HubError(fault.status, message).response(), fault.mode
        return self._dispatch(request), fault.mode if fault is not None else None

    def _dispatch(self, request: RecordedRequest) -> _Response:
        for method, pattern, handler in self._ROUTES:
            match = pattern.match(request.path)
            if match is None or method != request.method:
                continue
            try:
                with self._lock:
                    return handler(self, match, request)
            except _HubError as error:
                return error.response()
            except Exception as error:
                logger.exception("FakeHub: error while serving %s %s", request.method, request.path)
                return _HubError(500, f"FakeHub internal error: {error!r}").response()
        with self._lock:
            self.unhandled.append((request.method, request.path))
        logger.warning("FakeHub: no route for %s %s", request.method, request.path)
        return _HubError(
            404,
            f"FakeHub: no route for {request.method} {request.path} (not implemented in tests/fake_hub.py)",
        ).response()

    def _repo_from_match(self, match: re.Match[str], request: RecordedRequest) -> _Repo:
        repo_type = _PLURAL_TO_TYPE[match["type"]] if match["type"] else "model"
        repo_id = unquote(match["repo"])
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        if repo.private and self.require_auth_for_private and request.authorization is None:
            raise _HubError(401, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def _tree_entries(self, commit: _Commit, base: str, recursive: bool) -> list[dict[str, Any]] | None:
        """Entries under folder ``base`` (None if the folder does not exist), folders first."""
        prefix = f"{base}/" if base else ""
        folders: set[str] = set()
        files: list[dict[str, Any]] = []
        found = not base
        for path in sorted(commit.files):
            if not path.startswith(prefix):
                continue
            found = True
            parts = path[len(prefix) :].split("/")
            depth = len(parts) - 1 if recursive else min(len(parts) - 1, 1)
            folders.update(prefix + "/".join(parts[: i + 1]) for i in range(depth))
            if recursive or len(parts) == 1:
                files.append(commit.files[path].tree_entry(path))
        if not found:
            return None
        return [self._folder_entry(commit, folder) for folder in sorted(folders)] + files

    @staticmethod
    def _folder_entry(commit: _Commit, folder: str) -> dict[str, Any]:
        oid = hashlib.sha1(f"{commit.sha}:{folder}".encode()).hexdigest()
        return {"type": "directory", "oid": oid, "size": 0, "path": folder}

    def _serve_file(self, match: re.Match[str], request: RecordedRequest) -> _Response:
        repo = self._repo_from_match(match, request)
        commit = self._get_commit(repo, unquote(match["rev"]))
        path = unquote(match["path"])
        stored = commit.files.get(path)
        if stored is None:
            error = _HubError(404, f"Entry not found: {path}", "EntryNotFound")
            error.headers["X-Repo-Commit"] = commit.sha
            raise error
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{stored.oid}"',
            "X-Repo-Commit": commit.sha,
        }
        if stored.lfs:
            headers["X-Linked-Etag"] = f'"{stored.sha256}"'
            headers["X-Linked-Size"] = str(len(stored.data))
        return _ranged(stored.data, request.headers.get("range"), headers)

    def _repo_info(self, match: re.Match[str], request: RecordedRequest) -> _Response:
        repo = self._repo_from_match(match, request)
        revision = match.groupdict().get("rev")
        commit = self._get_commit(repo, unquote(revision) if revision else "main")
        siblings: list[dict[str, Any]] = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if request.flag("blobs"):
                stored = commit.files[path]
                sibling.update(size=len(stored.data), blobId=stored.oid)
                if stored.lfs:
                    sibling["lfs"] = {
                        "size": len(stored.data),
                        "sha256": stored.sha256,
                        "pointerSize": len(stored.pointer),
                    }
            siblings.append(sibling)
        return _json_response(
            {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
                "sha": commit.sha,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "createdAt": _iso(repo.created_at),
                "lastModified": _iso(commit.date),
                "siblings": siblings,
            }
        )

    def _list_tree(self, match: re.Match[str], request: RecordedRequest) -> _Response:
        repo = self._repo_from_match(match, request)
        commit = self._get_commit(repo, unquote(match["rev"]))
        base = unquote(match["path"] or "").strip("/")
        entries = self._tree_entries(commit, base, request.flag("recursive"))
        if entries is None:
            raise _HubError(404, f"Entry not found: {base}", "EntryNotFound")
        return _json_response(entries)

    def _paths_info(self, match: re.Match[str], request: RecordedRequest) -> _Response:
        repo = self._repo_from_match(match, request)
        commit = self._get_commit(repo, unquote(match["rev"]))
        if request.headers.get("content-type", "").startswith("application/json"):
            paths = request.json().get("paths", [])
        else:
            paths = parse_qs(request.body.decode()).get("paths", [])
        entries = []
        for path in (p.strip("/") for p in paths):
            if path in commit.files:
                entries.append(commit.files[path].tree_entry(path))
            elif any(name.startswith(f"{path}/") for name in commit.files):
                entries.append(self._folder_entry(commit, path))
        return _json_response(entries)

    def _preupload(self, match: re.Match[str], request: RecordedRequest) -> _Response:
        repo = self._repo_from_match(match, request)
        commit = self._get_commit(repo, unquote(match["rev"]))
        answers = []
        for item in request.json().get("files", []):
            existing = commit.files.get(item["path"])
            answers.append(
                {
                    "path": item["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_oid(existing.data) if existing is not None else None,
                }
            )
        return _json_response({"files": answers, "commitOid": commit.sha})

    def _commit(self, match: re.Match[str], request: RecordedRequest) -> _Response:
        repo = self._repo_from_match(match, request)
        revision = unquote(match["rev"])
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "Commit payload must start with a header line")
        header = lines[0]["value"]
        pr_number: int | None = None
        if request.flag("create_pr"):
            start = self._get_commit(repo, revision).sha
            pr_number, repo.next_pr = repo.next_pr, repo.next_pr + 1
            branch = f"refs/pr/{pr_number}"
            repo.branches[branch] = start
        elif revision in repo.branches:
            branch = revision
        else:
            raise _HubError(404, f"Invalid rev id: {revision} (commits must target a branch)", "RevisionNotFound")
        head = repo.commits[repo.branches[branch]]
        parent = header.get("parentCommit")
        if parent and not head.sha.startswith(parent):
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for line in lines[1:]:
            self._apply_operation(files, line["key"], line["value"])
        commit = self._new_commit(repo, branch, files, header.get("summary") or "")
        answer: dict[str, Any] = {
            "success": True,
            "commitOid": commit.sha,
            "commitUrl": f"{self._repo_url(repo)}/commit/{commit.sha}",
            "hookOutput": "",
        }
        if pr_number is not None:
            answer["pullRequestUrl"] = f"{self._repo_url(repo)}/discussions/{pr_number}"
        return _json_response(answer)

    @staticmethod
    def _apply_operation(files: dict[str, _StoredFile], key: str, value: dict[str, Any]) -> None:
        path = value["path"]
        if key == "file":
            content = value["content"]
            data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
            files[path] = _StoredFile(data)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            prefix = f"{path.rstrip('/')}/"
            for name in [name for name in files if name.startswith(prefix)]:
                del files[name]
        else:
            raise _HubError(400, f"FakeHub only supports regular uploads, not '{key}' operations")

    def _create_branch(self, match: re.Match[str], request: RecordedRequest) -> _Response:
        repo = self._repo_from_match(match, request)
        branch = unquote(match["rev"])
        if branch in repo.branches:
            raise _HubError(409, f"Reference already exists: {branch}")
        start = request.json().get("startingPoint") or "main"
        repo.branches[branch] = self._get_commit(repo, start).sha
        return _json_response({})

    def _create_repo_endpoint(self, match: re.Match[str], request: RecordedRequest) -> _Response:
        payload = request.json()
        name, organization = payload["name"], payload.get("organization")
        repo_id = name if "/" in name else f"{organization or self.user}/{name}"
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise _HubError(400, f"Invalid repo type: {repo_type}")
        existing = self._repos.get((repo_type, repo_id))
        if existing is not None:
            message = f"You already created this {repo_type} repo"
            raise _HubError(409, message, payload={"url": self._repo_url(existing)})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = self._create_repo(repo_id, repo_type, private, {".gitattributes": _StoredFile(_GITATTRIBUTES)})
        return _json_response({"url": self._repo_url(repo), "name": repo_id, "id": repo_id})

    def _delete_repo_endpoint(self, match: re.Match[str], request: RecordedRequest) -> _Response:
        payload = request.json()
        name, organization = payload["name"], payload.get("organization")
        repo_id = name if "/" in name else f"{organization or self.user}/{name}"
        if self._repos.pop((payload.get("type") or "model", repo_id), None) is None:
            raise _HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return _json_response({})

    def _whoami(self, match: re.Match[str], request: RecordedRequest) -> _Response:
        if request.authorization is None:
            raise _HubError(401, "Invalid credentials in Authorization header")
        return _json_response(
            {
                "type": "user",
                "name": self.user,
                "fullname": self.user,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}},
            }
        )

    def _validate_yaml(self, match: re.Match[str], request: RecordedRequest) -> _Response:
        return _json_response({"errors": [], "warnings": []})

    _ROUTES: tuple[tuple[str, re.Pattern[str], _Endpoint], ...] = (
        ("HEAD", _RESOLVE, _serve_file),
        ("GET", _RESOLVE, _serve_file),
        ("GET", re.compile(rf"^{_API_REPO}$"), _repo_info),
        ("GET", re.compile(rf"^{_API_REPO}/revision/(?P<rev>[^/]+)$"), _repo_info),
        ("GET", re.compile(rf"^{_API_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$"), _list_tree),
        ("POST", re.compile(rf"^{_API_REPO}/paths-info/(?P<rev>[^/]+)$"), _paths_info),
        ("POST", re.compile(rf"^{_API_REPO}/preupload/(?P<rev>[^/]+)$"), _preupload),
        ("POST", re.compile(rf"^{_API_REPO}/commit/(?P<rev>[^/]+)$"), _commit),
        ("POST", re.compile(rf"^{_API_REPO}/branch/(?P<rev>[^/]+)$"), _create_branch),
        ("POST", re.compile(r"^/api/repos/create$"), _create_repo_endpoint),
        ("DELETE", re.compile(r"^/api/repos/delete$"), _delete_repo_endpoint),
        ("GET", re.compile(r"^/api/whoami-v2$"), _whoami),
        ("POST", re.compile(r"^/api/validate-yaml$"), _validate_yaml),
    )


class _RequestHandler(BaseHTTPRequestHandler):
    """Turns HTTP/1.1 requests into `RecordedRequest` objects and writes `FakeHub` answers back."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        self._serve()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("FakeHub: " + format, *args)

    def _serve(self) -> None:
        split = urlsplit(self.path)
        request = RecordedRequest(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers={name.lower(): value for name, value in self.headers.items()},
            body=self._read_body(),
        )
        response, mode = self.server.hub._process(request)
        if response is None:
            self.close_connection = True
            return
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            body = response.body[: len(response.body) // 2] if mode == "truncate" else response.body
            self.wfile.write(body)
        if mode == "truncate":
            self.close_connection = True

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                continue
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""


class _Server(ThreadingHTTPServer):
    """Threading HTTP server that can close its open keep-alive connections on stop."""

    daemon_threads = True

    def __init__(self, hub: FakeHub) -> None:
        super().__init__(("127.0.0.1", 0), _RequestHandler)
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


def populate_hub_cache(
    cache_dir: str | os.PathLike[str],
    repo_id: str,
    files: Mapping[str, bytes | str],
    revision: str = "main",
    *,
    repo_type: str = "model",
) -> str:
    """Lay ``files`` out in the Hub cache ``cache_dir`` as ``hf_hub_download`` would; returns the commit sha.

    Writes ``<type>s--<org>--<name>/blobs/<git oid>``, ``snapshots/<sha>/<path>`` (relative symlinks to
    the blobs, copies where symlinks are unsupported) and ``refs/<revision>``. The sha is derived from
    the content, unless ``revision`` is itself a 40-hex commit sha (then it is used and no ref is
    written). ``cache_dir`` is the hub cache (``HF_HUB_CACHE``), not ``HF_HOME``.
    """
    contents = {path: _as_bytes(data) for path, data in files.items()}
    if _COMMIT_SHA.fullmatch(revision):
        commit_sha = revision
    else:
        digest = hashlib.sha1(f"{repo_type}/{repo_id}".encode())
        for path in sorted(contents):
            digest.update(f"{path}\0{git_blob_oid(contents[path])}\n".encode())
        commit_sha = digest.hexdigest()
    storage = Path(cache_dir) / _repo_folder_name(repo_id, repo_type)
    snapshot = storage / "snapshots" / commit_sha
    for path, data in contents.items():
        blob = storage / "blobs" / git_blob_oid(data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = snapshot.joinpath(*path.split("/"))
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.unlink(missing_ok=True)
        try:
            pointer.symlink_to(os.path.relpath(blob, pointer.parent))
        except OSError:
            shutil.copyfile(blob, pointer)
    if not _COMMIT_SHA.fullmatch(revision):
        ref = storage / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit_sha)
    return commit_sha


def configure_hf_endpoint(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point ``huggingface_hub`` at ``endpoint``, including the copies of ``HF_ENDPOINT`` made at import."""
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _git_credential, _http

    endpoint = endpoint.rstrip("/")
    host = urlsplit(endpoint).hostname or ""
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(_git_credential, "ENDPOINT", endpoint)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    if hasattr(constants, "HF_URL_HOSTS"):
        monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {host})
    if hasattr(_http, "_HUB_ORIGINS"):
        monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(endpoint)})
    file_system = sys.modules.get("huggingface_hub.hf_file_system")
    if file_system is not None:
        monkeypatch.setattr(file_system.hffs, "endpoint", endpoint)
        monkeypatch.setattr(file_system.hffs._api, "endpoint", endpoint)


def isolate_hf_home(monkeypatch: pytest.MonkeyPatch, hf_home: Path, *, offline: bool) -> Path:
    """Give ``huggingface_hub`` a private ``HF_HOME`` (env and import-time constants); returns the hub cache.

    Also disables telemetry, drops ``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN`` (the token file is under
    ``hf_home`` too) and sets offline mode to ``offline``.
    """
    from huggingface_hub import constants

    hub_cache, assets, token = hf_home / "hub", hf_home / "assets", hf_home / "token"
    hub_cache.mkdir(parents=True, exist_ok=True)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    environment = {
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": assets,
        "HF_XET_CACHE": hf_home / "xet",
        "HF_TOKEN_PATH": token,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "1" if offline else "0",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    derived = {
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(assets),
        "HUGGINGFACE_ASSETS_CACHE": str(assets),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(token),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(hf_home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(hf_home / ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
    }
    for name, value in derived.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    for module_name, name, value in (
        ("huggingface_hub.utils._cache_manager", "HF_HUB_CACHE", str(hub_cache)),
        ("huggingface_hub.utils._cache_assets", "HF_ASSETS_CACHE", str(assets)),
    ):
        module = importlib.import_module(module_name)
        if hasattr(module, name):
            monkeypatch.setattr(module, name, value)
    return hub_cache


def _reset_http_clients() -> None:
    """Drop pooled connections and cached file systems that may point at another endpoint."""
    from huggingface_hub.utils import _http

    _http.close_session()
    file_system = sys.modules.get("huggingface_hub.hf_file_system")
    if file_system is not None:
        file_system.HfFileSystem.clear_instance_cache()


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """A running `FakeHub`, with ``huggingface_hub`` pointed at it and an empty, online, private HF_HOME."""
    isolate_hf_home(monkeypatch, tmp_path_factory.mktemp("hf_home"), offline=False)
    with FakeHub() as hub:
        configure_hf_endpoint(monkeypatch, hub.url)
        _reset_http_clients()
        yield hub
        _reset_http_clients()


@pytest.fixture
def offline_hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Empty hub cache (``HF_HUB_CACHE``) with ``HF_HUB_OFFLINE=1``; fill it with `populate_hub_cache`."""
    hub_cache = isolate_hf_home(monkeypatch, tmp_path_factory.mktemp("hf_home"), offline=True)
    configure_hf_endpoint(monkeypatch, UNREACHABLE_ENDPOINT)
    return hub_cache
