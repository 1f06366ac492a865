"""A local HTTP server that speaks as much of the Hugging Face hub's protocol as `hf_hub_download` uses.

`HEAD|GET /{org}/{repo}/resolve/{revision}/{path}` (revision URL-quoted): a HEAD answers with the headers
huggingface_hub reads for the file's metadata (`X-Repo-Commit`, `ETag`, `X-Linked-Etag`, `X-Linked-Size`,
`Content-Length`), a GET streams the bytes, honouring `Range: bytes=N-` (huggingface_hub resumes interrupted
transfers with it). Errors carry the hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo)
so huggingface_hub raises its typed exceptions.

Tests publish bytes under repo/path/revision, count requests per file, and inject faults: fail the first N GETs
with a 500, truncate the first N transfers (the connection closes before Content-Length bytes), send a short body
with a matching Content-Length, corrupt the bytes, slow the transfer down, answer 503 to everything (a hub that is
down), require a token, or advertise a size the disk cannot hold.
"""
from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
CHUNK = 64 * 1024


@dataclass
class Faults:
    fail_first: int = 0  # GETs answered 500 before any byte
    truncate_first: int = 0  # GETs whose connection closes halfway through the body
    short_first: int = 0  # GETs that send half the body with a Content-Length saying so (a broken proxy)
    corrupt_first: int = 0  # GETs whose bytes are altered (same length)
    chunk_delay_s: float = 0.0  # pause between 64 KiB chunks, to make transfers overlap
    advertised_size: int | None = None  # X-Linked-Size to claim instead of the real size

    def take(self, name: str) -> bool:
        remaining = getattr(self, name)
        if remaining > 0:
            setattr(self, name, remaining - 1)
            return True
        return False


@dataclass
class Repo:
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> path -> bytes
    token: str | None = None  # when set, requests must carry "Authorization: Bearer <token>"


class FakeHub:
    def __init__(self, chunk_size: int = CHUNK) -> None:
        self.chunk_size = chunk_size  # bytes per write; benchmarks raise it so the server is not the bottleneck
        self.repos: dict[str, Repo] = {}
        self.faults: dict[tuple[str, str], Faults] = {}
        self.counts: Counter[tuple[str, str, str]] = Counter()  # (method, repo, path)
        self.requests = 0  # every request, whatever it asked
        self.down = False
        self._lock = threading.Lock()
        hub = self

        class Handler(_Handler):
            owner = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="fake-hub", daemon=True)

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    # -- content ----------------------------------------------------------------------------------------------
    def publish(self, repo: str, path: str, data: bytes, revision: str = "main", commit: str | None = None) -> str:
        """Serve `data` as `path` of `repo` at `revision` (a branch/tag, or a 40-hex commit); returns the commit."""
        with self._lock:
            state = self.repos.setdefault(repo, Repo())
            if _COMMIT.match(revision):
                commit = revision
            else:
                commit = commit or state.refs.get(revision) or hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
                state.refs[revision] = commit
            state.commits.setdefault(commit, {})[path] = data
            return commit

    def require_token(self, repo: str, token: str) -> None:
        self.repos.setdefault(repo, Repo()).token = token

    def fault(self, repo: str, path: str, **kwargs) -> Faults:
        faults = self.faults.setdefault((repo, path), Faults())
        for key, value in kwargs.items():
            setattr(faults, key, value)
        return faults

    def gets(self, repo: str, path: str) -> int:
        return self.counts[("GET", repo, path)]

    def heads(self, repo: str, path: str) -> int:
        return self.counts[("HEAD", repo, path)]


class _Handler(BaseHTTPRequestHandler):
    owner: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # quiet: tests read counts, not logs
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    # -- routing ----------------------------------------------------------------------------------------------
    def _serve(self, head: bool) -> None:
        hub = self.owner
        with hub._lock:
            hub.requests += 1
        parts = self.path.split("?", 1)[0].lstrip("/").split("/")
        if hub.down:
            return self._error(503, None, "the hub is down for maintenance")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(404, None, "not a resolve URL")
        repo_id, revision, path = f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:]))
        with hub._lock:
            hub.counts[("HEAD" if head else "GET", repo_id, path)] += 1
        repo = hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository Not Found for {repo_id}")
        if repo.token is not None:
            sent = self.headers.get("Authorization", "")
            if not sent:
                return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have "
                                                     "access to it and be authenticated to access it.")
            if sent != f"Bearer {repo.token}":
                return self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not "
                                                     "in the authorized list.")
        commit = repo.refs.get(revision) or (revision if revision in repo.commits else None)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        data = repo.commits[commit].get(path)
        if data is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist at {revision}", commit=commit)
        faults = hub.faults.get((repo_id, path), Faults())
        if head:
            return self._head(data, commit, faults)
        return self._get(data, commit, faults)

    def _metadata_headers(self, data: bytes, commit: str, faults: Faults) -> None:
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", etag)
        self.send_header("X-Linked-Etag", etag)
        self.send_header("X-Linked-Size", str(faults.advertised_size or len(data)))
        self.send_header("Accept-Ranges", "bytes")

    def _head(self, data: bytes, commit: str, faults: Faults) -> None:
        self.send_response(200)
        self._metadata_headers(data, commit, faults)
        self.send_header("Content-Length", str(faults.advertised_size or len(data)))
        self.end_headers()

    def _get(self, data: bytes, commit: str, faults: Faults) -> None:
        with self.owner._lock:
            fail = faults.take("fail_first")
            truncate = not fail and faults.take("truncate_first")
            short = not fail and not truncate and faults.take("short_first")
            corrupt = not fail and faults.take("corrupt_first")
        if fail:
            return self._error(500, None, "internal error (injected)")
        start = 0
        match = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
        body = memoryview(data)[start:]  # no copy: benchmarks serve hundreds of megabytes
        if corrupt and len(body):
            body = memoryview(bytes([body[0] ^ 0xFF]) + bytes(body[1:]))
        if short:
            body = body[: len(body) // 2]
        self.send_response(206 if match else 200)
        self._metadata_headers(data, commit, faults)
        if match:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        limit = len(body) // 2 if truncate else len(body)
        step = self.owner.chunk_size
        for offset in range(0, limit, step):
            try:
                self.wfile.write(body[offset:min(offset + step, limit)])
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return
            if faults.chunk_delay_s:
                time.sleep(faults.chunk_delay_s)
        if truncate:
            self.close_connection = True  # fewer bytes than Content-Length, then the connection ends

    def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        body = ('{"error": "%s"}' % message.replace('"', "'")).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
