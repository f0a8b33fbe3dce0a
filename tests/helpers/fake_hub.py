"""A loopback HTTP server that answers the Hub's read endpoints, for tests that drive the real `huggingface_hub`
download client (``model_info``, ``snapshot_download``, ``hf_hub_download``) without the network.

Endpoints, as the Hub serves them and as huggingface_hub 2.x calls them:

- ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{rev}``: model info, ``sha`` = the commit the
  revision points to, ``siblings`` = the files at that commit.
- ``GET /api/models/{repo}/tree/{rev}?recursive=...``: the file list (path, size, oid) at a revision.
- ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}``: a file, with ``X-Repo-Commit``, ``ETag`` and ``Content-Length``.

Unknown repos answer 404 with ``X-Error-Code: RepoNotFound``, unknown revisions ``RevisionNotFound`` and unknown
files ``EntryNotFound``, which huggingface_hub turns into its typed errors. Every request is recorded
(method, path, headers) so a test can assert which files were, or were not, fetched.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class FakeRepo:
    """A model repo: named refs (branches, tags) pointing at commits, each commit a {path: bytes} snapshot."""

    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)

    def add_commit(self, files: dict[str, bytes], *, ref: str = "main") -> str:
        """Add a commit holding `files` and point `ref` at it. Returns the 40-hex commit sha."""
        digest = hashlib.sha1(
            repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()
        )
        sha = hashlib.sha1(f"{digest.hexdigest()}:{len(self.commits)}".encode()).hexdigest()
        self.commits[sha] = dict(files)
        self.refs[ref] = sha
        return sha

    def commit_of(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


def folder_files(folder: str | Path) -> dict[str, bytes]:
    """All files of a folder (recursively), keyed by their path relative to it, as a commit for FakeRepo."""
    root = Path(folder)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class _Handler(BaseHTTPRequestHandler):
    server: FakeHubServer

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(
        self, code: int, body: bytes = b"", headers: dict[str, str] | None = None, *, head: bool = False
    ) -> None:
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, code: int, payload: object, headers: dict[str, str] | None = None) -> None:
        self._send(
            code, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})}
        )

    def _error(self, code: str, message: str, *, head: bool = False) -> None:
        self._send(
            404,
            json.dumps({"error": message}).encode(),
            {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message},
            head=head,
        )

    def _record(self) -> str:
        url = urlsplit(self.path)
        self.server.requests.append(
            {
                "method": self.command,
                "path": unquote(url.path),
                "query": url.query,
                "headers": {k.lower(): v for k, v in self.headers.items()},
            }
        )
        return unquote(url.path)

    def _repo(self, repo_id: str, *, head: bool = False) -> FakeRepo | None:
        repo = self.server.repos.get(repo_id)
        if repo is None:
            self._error("RepoNotFound", f"Repository {repo_id} not found", head=head)
        return repo

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, *, head: bool) -> None:
        path = self._record()
        if path.startswith("/api/models/"):
            return self._api(path.removeprefix("/api/models/"))
        # /{org}/{name}/resolve/{rev}/{file}
        parts = path.lstrip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id = "/".join(parts[:2])
            if (repo := self._repo(repo_id, head=head)) is None:
                return None
            sha = repo.commit_of(parts[3])
            if sha is None:
                return self._error("RevisionNotFound", f"Invalid rev id: {parts[3]}", head=head)
            filename = "/".join(parts[4:])
            files = repo.commits[sha]
            if filename not in files:
                return self._error("EntryNotFound", f"{filename} does not exist at {sha}", head=head)
            data = files[filename]
            etag = hashlib.sha256(data).hexdigest()
            return self._send(
                200,
                data,
                {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"},
                head=head,
            )
        return self._send(404, b"unexpected endpoint", head=head)

    def _api(self, rest: str) -> None:
        parts = rest.split("/")
        repo_id = "/".join(parts[:2])
        if (repo := self._repo(repo_id)) is None:
            return None
        tail = parts[2:]
        if tail and tail[0] in ("revision", "tree"):
            revision = "/".join(tail[1:]) if tail[0] == "revision" else tail[1]
        else:
            revision = "main"
        sha = repo.commit_of(revision)
        if sha is None:
            return self._error("RevisionNotFound", f"Invalid rev id: {revision}")
        files = repo.commits[sha]
        if tail and tail[0] == "tree":
            entries = [
                {"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                for p, d in sorted(files.items())
            ]
            return self._json(200, entries)
        return self._json(
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": sha,
                "private": False,
                "siblings": [{"rfilename": p} for p in sorted(files)],
            },
        )


class FakeHubServer(ThreadingHTTPServer):
    """The server; `repos` maps "org/name" to a FakeRepo, `requests` lists what was asked."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[dict] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, ref: str = "main") -> str:
        """Create (or extend) `repo_id` with a commit of `files` on `ref`. Returns the commit sha."""
        return self.repos.setdefault(repo_id, FakeRepo()).add_commit(files, ref=ref)

    def downloaded(self, repo_id: str | None = None) -> list[str]:
        """Files fetched with GET from the resolve endpoint (HEAD requests excluded), optionally of one repo."""
        out = []
        for r in self.requests:
            parts = r["path"].lstrip("/").split("/")
            if r["method"] == "GET" and len(parts) >= 5 and parts[2] == "resolve":
                if repo_id is None or "/".join(parts[:2]) == repo_id:
                    out.append("/".join(parts[4:]))
        return out


@contextmanager
def fake_hub() -> Iterator[FakeHubServer]:
    """Run a FakeHubServer on a free loopback port for the duration of the block."""
    server = FakeHubServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
