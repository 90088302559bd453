"""A stand-in for the Hugging Face Hub on loopback, serving exactly the endpoints that
``huggingface_hub`` 2.4.0 calls for ``snapshot_download`` / ``hf_hub_download`` /
``HfApi.list_repo_files`` (read from its source: ``hf_api.py``, ``_snapshot_download.py``,
``file_download.py``, ``utils/_http.py``):

- ``GET /api/models/{repo}/revision/{rev}``: ``{"id", "sha", "siblings"}`` (``repo_info``; skipped
  when the revision is already a commit hash);
- ``GET /api/models/{repo}/tree/{commit}?recursive=...&expand=...``: the file list, one page (no
  ``Link`` header), each ``{"type": "file", "path", "size", "oid"}`` plus ``"lfs": {"oid": sha256,
  "size", "pointerSize"}`` for weights, as the Hub stores them;
- ``HEAD /{repo}/resolve/{commit}/{file}``: no redirect, with ``X-Repo-Commit``, ``ETag`` (quoted;
  the git blob sha1 of small files), ``X-Linked-Etag`` and ``X-Linked-Size`` for LFS files (the
  sha256, which ``huggingface_hub`` takes as the blob name), ``Content-Length``;
- ``GET`` of the same URL: the bytes.

Errors carry the Hub's ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``), which ``hf_raise_for_status`` turns into its typed errors. Every request is
logged (``Hub.log``) so tests can say exactly what was fetched. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")


@dataclass
class Repo:
    """One model repository: commits (sha -> files) and refs (branch/tag -> sha)."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def add_commit(self, files: Mapping[str, bytes], *refs: str) -> str:
        sha = hashlib.sha1(
            json.dumps(
                sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())
            ).encode()
            + str(len(self.commits)).encode()
        ).hexdigest()
        self.commits[sha] = dict(files)
        for r in refs:
            self.refs[r] = sha
        return sha

    @staticmethod
    def from_folder(folder: Path) -> dict[str, bytes]:
        return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def is_lfs(name: str) -> bool:
    return name.endswith(LFS_SUFFIXES)


class Hub:
    """The server: ``with Hub(repos) as hub: ... hub.endpoint ... hub.log``."""

    def __init__(self, repos: Mapping[str, Repo]) -> None:
        self.repos = dict(repos)
        self.log: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                hub._handle(self, body=True)

            def do_HEAD(self) -> None:
                hub._handle(self, body=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Hub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fetched(self) -> list[str]:
        """The files whose bytes were sent (GET of a resolve URL), as ``repo:file``."""
        out = []
        for method, path in self.log:
            if method == "GET" and "/resolve/" in path:
                repo, _, rest = path.lstrip("/").partition("/resolve/")
                out.append(f"{repo}:{rest.partition('/')[2]}")
        return sorted(out)

    # --- request handling -------------------------------------------------------------------

    def _send(
        self,
        h: BaseHTTPRequestHandler,
        status: int,
        body: bytes,
        headers: Mapping[str, str],
        send_body: bool,
    ) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if send_body:
            h.wfile.write(body)

    def _error(
        self, h: BaseHTTPRequestHandler, code: str, send_body: bool, commit: str | None = None
    ) -> None:
        headers = {"X-Error-Code": code, "Content-Type": "application/json"}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(h, 404, json.dumps({"error": code}).encode(), headers, send_body)

    def _lookup(
        self, h: BaseHTTPRequestHandler, repo_id: str, rev: str, send_body: bool
    ) -> tuple[str, dict[str, bytes]] | None:
        """The commit and files of ``repo_id`` at ``rev``; None after answering the Hub's 404."""
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, "RepoNotFound", send_body)
            return None
        sha = repo.refs.get(rev) or (rev if rev in repo.commits else None)
        if sha is None:
            self._error(h, "RevisionNotFound", send_body)
            return None
        return sha, repo.commits[sha]

    def _handle(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        url = urlsplit(h.path)
        path = unquote(url.path)
        self.log.append((h.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo_id, kind, rev = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
            found = self._lookup(h, repo_id, rev, body)
            if found is None:
                return None
            sha, files = found
            if kind == "revision":
                doc: object = {
                    "id": repo_id,
                    "sha": sha,
                    "siblings": [{"rfilename": n} for n in files],
                }
            else:
                doc = [
                    {
                        "type": "file",
                        "path": n,
                        "size": len(d),
                        "oid": git_blob_id(d),
                        **(
                            {
                                "lfs": {
                                    "oid": hashlib.sha256(d).hexdigest(),
                                    "size": len(d),
                                    "pointerSize": 134,
                                }
                            }
                            if is_lfs(n)
                            else {}
                        ),
                    }
                    for n, d in files.items()
                ]
            return self._send(
                h, 200, json.dumps(doc).encode(), {"Content-Type": "application/json"}, body
            )
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            found = self._lookup(h, repo_id, rev, body)
            if found is None:
                return None
            sha, files = found
            data = files.get(name)
            if data is None:
                return self._error(h, "EntryNotFound", body, commit=sha)
            headers = {
                "X-Repo-Commit": sha,
                "ETag": f'"{git_blob_id(data)}"',
                "Content-Type": "application/octet-stream",
            }
            if is_lfs(name):
                headers |= {
                    "X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"',
                    "X-Linked-Size": str(len(data)),
                }
            return self._send(h, 200, data, headers, body)
        return self._send(h, 404, b"{}", {"Content-Type": "application/json"}, body)
