"""Model files from the Hugging Face hub, through `huggingface_hub` and into its cache.

The cache is huggingface_hub's own (`HF_HUB_CACHE`, else `HF_HOME/hub`), meant to be a persistent volume shared by
replicas; `HF_TOKEN` opens gated repos; `HF_HUB_OFFLINE=1` serves from the cache alone; `HF_ENDPOINT` points at
another hub (tests use a local one). All four are read at call time, not at import time as huggingface_hub's
constants are, so one process can be pointed elsewhere and the endpoint is passed to every call explicitly.

What this module adds to `hf_hub_download`:
- one download per file across threads and processes: a file lock of ours, next to huggingface_hub's own locks,
  around "look in the cache, else download and verify", so a second caller waits and then finds the verified file
  (huggingface_hub's lock only guards the blob write; a caller arriving during our sha256 check would otherwise
  take a file that may still be rejected);
- a metadata request of our own first, without huggingface_hub's silent multi-second retries, so a missing repo,
  revision or file, a gated repo and a hub that is down each become a typed error at once, and the size is known
  before anything is written (no space: StorageError, nothing written);
- retries with exponential backoff, then an error that names the repo and says what to do;
- sha256 verification when the registry publishes one (a mismatch deletes the cached file; the next attempt
  downloads again), remembered per blob so a verified file is not hashed again;
- progress: logged (bytes, rate, ETA) and reported through a callable, for the executor's `/ws` progress events.

huggingface_hub itself never renames a partial download into place (it writes a per-process temporary file and
checks its size against the hub's), so a truncated transfer never looks complete.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from engine.errors import BadRequest, EngineError, Forbidden, StorageError

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
EventFn = Callable[[str, dict[str, Any]], None]
DEFAULT_ENDPOINT = "https://huggingface.co"
_REF = re.compile(r"^hf://(?P<org>[A-Za-z0-9][A-Za-z0-9_.-]*)/(?P<repo>[A-Za-z0-9_.-]+)/(?P<path>[^@]+?)"
                  r"(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9_./-]*))?$")
_TRUE = {"1", "on", "yes", "true"}
_HASH_CHUNK = 8 * 1024 * 1024


# -- errors: each says what to do; handler/errors.py maps them to statuses ---------------------------------------
class HubAccessDenied(BadRequest):
    """A gated or private repo and no token (or a token without access): the request cannot succeed as sent."""


class HubNotFound(BadRequest):
    """The repo, the revision or the file does not exist on the hub."""


class HubUnavailable(EngineError):
    """The hub could not be reached or answered with a server error; worth retrying later."""


class HubOffline(HubUnavailable):
    """`HF_HUB_OFFLINE` is set and the file is not in the cache."""


class DownloadFailed(HubUnavailable):
    """Every attempt ended in a truncated, corrupt or failed transfer."""


class IntegrityError(DownloadFailed):
    """The downloaded bytes do not have the registry's sha256 (or size)."""


# -- references ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HubFile:
    """One file of one hub repo at one revision, with what is known about its content."""
    repo: str  # "org/name"
    path: str  # path inside the repo
    revision: str = "main"
    sha256: str | None = None
    size: int | None = None

    @property
    def display(self) -> str:
        return f"{self.repo}/{self.path}@{self.revision}"

    @property
    def org(self) -> str:
        return self.repo.split("/", 1)[0]


def is_hub_reference(name: str) -> bool:
    return name.startswith("hf://")


def parse_reference(text: str) -> HubFile:
    """`hf://org/repo/path/in/repo.safetensors[@revision]` -> HubFile; a malformed one is a BadRequest."""
    match = _REF.match(text)
    path = match["path"] if match else ""
    pieces = path.split("/")
    if not match or "" in pieces or ".." in pieces or "." in pieces or "\\" in path or "\x00" in path:
        raise BadRequest(f"{text!r} is not a hub reference; write hf://org/repo/path/in/repo.safetensors, "
                         "optionally followed by @revision (a commit, branch or tag)")
    revision = match["revision"] or "main"
    if ".." in revision:
        raise BadRequest(f"revision {revision!r} in {text!r} is not a commit, branch or tag name")
    return HubFile(repo=f"{match['org']}/{match['repo']}", path=path, revision=revision)


class AllowList:
    """Which orgs or org/repo pairs an `hf://` reference may name (case-insensitive, like hub names)."""

    def __init__(self, spec: str = ""):
        items = [item.strip().strip("/").lower() for item in spec.split(",")]
        self.orgs = frozenset(item for item in items if item and "/" not in item)
        self.repos = frozenset(item for item in items if "/" in item)

    def __bool__(self) -> bool:
        return bool(self.orgs or self.repos)

    def allows(self, repo: str) -> bool:
        repo = repo.lower()
        return repo in self.repos or repo.split("/", 1)[0] in self.orgs

    def check(self, ref: HubFile, text: str) -> None:
        """Forbidden unless allowed; decided from the reference alone, before any network call."""
        if not self:
            raise Forbidden(f"{text!r}: hf:// references are turned off on this server; the operator enables them "
                            "by listing orgs or repos in COMFY_ENDPOINT_HUB_ALLOW (--hub-allow)")
        if not self.allows(ref.repo):
            allowed = ", ".join(sorted(self.orgs | self.repos))
            raise Forbidden(f"{text!r}: the repo {ref.repo} is not in this server's hub allow-list ({allowed}); "
                            "ask the operator to add its org or repo to COMFY_ENDPOINT_HUB_ALLOW")


# -- the environment, read at call time ---------------------------------------------------------------------------
@dataclass(frozen=True)
class HubEnv:
    endpoint: str
    cache_dir: Path
    token: str | None
    offline: bool

    @classmethod
    def read(cls, environ: dict[str, str] | None = None) -> HubEnv:
        env = os.environ if environ is None else environ
        if env.get("HF_HUB_CACHE"):
            cache = Path(os.path.expandvars(env["HF_HUB_CACHE"])).expanduser()
        else:
            home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
            cache = Path(os.path.expandvars(home)).expanduser() / "hub"
        offline = (env.get("HF_HUB_OFFLINE") or "").strip().lower() in _TRUE
        return cls(endpoint=(env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"), cache_dir=cache,
                   token=env.get("HF_TOKEN") or None, offline=offline)


# -- progress ---------------------------------------------------------------------------------------------------------
class _Progress:
    """Bytes received for one download: logged every few seconds and passed to the caller's callable."""

    def __init__(self, label: str, total: int | None, report: ProgressFn | None, log_every_s: float):
        self.label, self.total, self.report, self.log_every_s = label, total, report, log_every_s
        self.done = 0
        self.started = time.monotonic()
        self._last_log = self._last_report = self.started

    def begin(self, total: int | None, initial: int) -> None:
        if total:
            self.total = total
        self.done = max(self.done, initial)

    def add(self, n: int) -> None:
        self.done = max(0, self.done + n)  # a resumed transfer that restarts from zero reports a negative step
        now = time.monotonic()
        if self.report is not None and (now - self._last_report >= 0.2 or self.done == self.total):
            self._last_report = now
            self.report(self.done, self.total or 0)  # may raise Interrupted: the transfer stops, nothing is kept
        if now - self._last_log >= self.log_every_s:
            self._last_log = now
            log.info("downloading %s: %s", self.label, self.describe(now))

    def describe(self, now: float | None = None) -> str:
        elapsed = max(1e-6, (now or time.monotonic()) - self.started)
        rate = self.done / elapsed
        text = f"{_size(self.done)}"
        if self.total:
            text += f" of {_size(self.total)} ({100 * self.done / self.total:.0f}%)"
        text += f", {_size(rate)}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {_duration((self.total - self.done) / rate)}"
        return text

    def bar_class(self) -> type:
        """A class huggingface_hub can use as its `tqdm_class`: it only calls update() and closes it."""
        sink = self

        class Bar:
            def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **kwargs: Any):
                sink.begin(total, initial)
                self.n, self.total = initial, total

            def update(self, n: int = 1) -> None:
                self.n += n
                sink.add(n)

            def update_transfer(self, n: int = 1) -> None:  # network bytes, already counted by update()
                pass

            def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
                pass

            set_transfer_postfix_str = set_postfix_str
            refresh = set_postfix_str

            def close(self) -> None:
                pass

            def __enter__(self) -> Bar:
                return self

            def __exit__(self, *exc: Any) -> None:
                self.close()

        return Bar


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# -- the hub ----------------------------------------------------------------------------------------------------------
class Hub:
    """Fetches `HubFile`s into the hub cache: once, verified, with retries (see the module docstring)."""

    def __init__(self, retries: int = 3, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 log_every_s: float = 5.0, environ: dict[str, str] | None = None):
        self.retries = max(1, retries)  # attempts per file, the first included
        self.backoff_s = backoff_s  # wait after the first failed attempt; doubles each time
        self.max_backoff_s = max_backoff_s
        self.log_every_s = log_every_s
        self.environ = environ  # None: the process environment, read at each call
        self._thread_locks: dict[str, threading.Lock] = {}
        self._verified: set[tuple[str, int, int]] = set()  # blobs hashed by this process (a read-only cache)
        self._guard = threading.Lock()

    def env(self) -> HubEnv:
        return HubEnv.read(self.environ)

    # -- cache ---------------------------------------------------------------------------------------------------
    def cached(self, ref: HubFile) -> Path | None:
        """The cached file when present and (when the sha256 is known) already verified; no network, no lock."""
        path, state = self._lookup(ref, self.env())
        return path if state == "ok" else None

    def has(self, ref: HubFile) -> bool:
        """Whether the cache holds the file at all (verified or not); no network."""
        return self._lookup(ref, self.env())[1] != "missing"

    def _lookup(self, ref: HubFile, env: HubEnv) -> tuple[Path | None, str]:
        """(path, state): state is "ok", "unverified" (sha256 known, not checked yet), "bad" or "missing"."""
        from huggingface_hub import try_to_load_from_cache

        try:
            found = try_to_load_from_cache(ref.repo, ref.path, cache_dir=str(env.cache_dir), revision=ref.revision)
        except Exception:  # an unreadable cache is a miss; the download path reports the real problem
            return None, "missing"
        if not isinstance(found, str) or not os.path.isfile(found):
            return None, "missing"
        path = Path(found)
        if ref.size is not None and path.stat().st_size != ref.size:
            return path, "bad"
        if ref.sha256 and not self._is_verified(path, ref.sha256, env):
            return path, "unverified"
        return path, "ok"

    def _marker(self, sha256: str, env: HubEnv) -> Path:
        return env.cache_dir / ".comfy-endpoint" / "verified" / sha256

    def _is_verified(self, path: Path, sha256: str, env: HubEnv) -> bool:
        try:
            blob = path.resolve()
            stat = blob.stat()
        except OSError:
            return False
        if (str(blob), stat.st_size, stat.st_mtime_ns) in self._verified:
            return True
        try:
            record = json.loads(self._marker(sha256, env).read_text())
        except (OSError, ValueError):
            return False
        return record == {"blob": str(blob), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def _mark_verified(self, path: Path, sha256: str, env: HubEnv) -> None:
        blob = path.resolve()
        stat = blob.stat()
        with self._guard:
            self._verified.add((str(blob), stat.st_size, stat.st_mtime_ns))
        marker = self._marker(sha256, env)
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            temporary = marker.with_name(f"{marker.name}.{os.getpid()}.{threading.get_ident()}")
            temporary.write_text(json.dumps({"blob": str(blob), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))
            os.replace(temporary, marker)
        except OSError as exc:  # a read-only cache still works; the file is hashed again next time
            log.warning("could not record the verified sha256 of %s: %s", blob, exc)

    def _discard(self, path: Path, ref: HubFile, env: HubEnv) -> None:
        """Remove a cached file that failed verification: the snapshot entry and the blob behind it."""
        blob = path.resolve()
        victims = [path, blob] + ([self._marker(ref.sha256, env)] if ref.sha256 else [])
        for victim in victims:
            try:
                victim.unlink(missing_ok=True)
            except OSError as exc:  # a read-only cache: the next attempt finds it again and fails the same way
                log.warning("could not remove the corrupt %s: %s", victim, exc)

    def _verify(self, path: Path, ref: HubFile, env: HubEnv) -> None:
        size = path.stat().st_size
        if ref.size is not None and size != ref.size:
            self._discard(path, ref, env)
            raise IntegrityError(f"{ref.display} has {size} bytes, the registry says {ref.size}")
        if ref.sha256:
            digest = sha256_of(path)
            if digest != ref.sha256:
                self._discard(path, ref, env)
                raise IntegrityError(f"{ref.display} has sha256 {digest}, the registry says {ref.sha256}")
            self._mark_verified(path, ref.sha256, env)

    # -- fetching ------------------------------------------------------------------------------------------------
    def fetch(self, ref: HubFile, *, progress: ProgressFn | None = None, events: EventFn | None = None,
              describe: dict[str, Any] | None = None) -> Path:
        """The local path of `ref`, downloading it first when the cache lacks it (blocking). Emits
        "model_download" {**describe, repo, bytes, seconds} through `events` when it downloaded."""
        env = self.env()
        path, state = self._lookup(ref, env)
        if state == "ok":
            return path  # type: ignore[return-value]
        if state == "missing" and env.offline:
            raise self._offline_error(ref, env)
        with self._locked(ref, env):
            path, state = self._lookup(ref, env)  # another thread or process may have finished meanwhile
            if state == "ok":
                return path  # type: ignore[return-value]
            if state in ("unverified", "bad") and path is not None:
                try:
                    self._verify(path, ref, env)
                    return path
                except IntegrityError as exc:
                    log.warning("cached %s is corrupt (%s); downloading it again", ref.display, exc)
            if env.offline:
                raise self._offline_error(ref, env)
            return self._download(ref, env, progress, events, describe or {})

    def _offline_error(self, ref: HubFile, env: HubEnv) -> HubOffline:
        return HubOffline(f"HF_HUB_OFFLINE is set and {ref.display} is not in the hub cache {env.cache_dir}; fill "
                          "the cache once while online (e.g. with COMFY_ENDPOINT_PRELOAD) or unset HF_HUB_OFFLINE")

    def _locked(self, ref: HubFile, env: HubEnv):
        from filelock import FileLock

        from huggingface_hub.file_download import repo_folder_name

        key = hashlib.sha1(f"{ref.revision}\x00{ref.path}".encode()).hexdigest()
        path = env.cache_dir / ".locks" / "comfy-endpoint" / repo_folder_name(repo_id=ref.repo, repo_type="model")
        lock_file = path / f"{key}.lock"
        with self._guard:
            thread_lock = self._thread_locks.setdefault(str(lock_file), threading.Lock())
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise _storage_error(exc, f"cannot create the lock folder {path}") from exc
            # a read-only cache (offline replicas mount it so): nothing can be written, so nothing to serialise
            log.debug("hub cache %s is read-only; locking within this process only", env.cache_dir)
            return _Both(thread_lock, None)
        return _Both(thread_lock, FileLock(str(lock_file)))

    def _download(self, ref: HubFile, env: HubEnv, progress: ProgressFn | None, events: EventFn | None,
                  describe: dict[str, Any]) -> Path:
        last: Exception | None = None
        for attempt in range(1, self.retries + 1):
            try:
                return self._attempt(ref, env, progress, events, describe)
            except (HubUnavailable, _Transient) as exc:
                last = exc
            if attempt < self.retries:
                wait = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                log.warning("download of %s failed (attempt %d of %d): %s; retrying in %.1f s", ref.display,
                            attempt, self.retries, last, wait)
                time.sleep(wait)
        assert last is not None
        advice = (f"the hub at {env.endpoint} may be down or the connection unstable; retry later, raise "
                  "COMFY_ENDPOINT_DOWNLOAD_RETRIES, or put the file in the model folder yourself")
        if isinstance(last, IntegrityError):
            raise IntegrityError(f"{ref.display} failed verification on all {self.retries} attempts: {last}; the "
                                 "hub serves other bytes than the registry names: check the registry entry "
                                 "(revision, sha256) or the network path (a proxy rewriting files)") from last
        cls = type(last) if isinstance(last, HubUnavailable) else DownloadFailed
        raise cls(f"could not download {ref.display} after {self.retries} attempt(s): {last}; {advice}") from last

    def _attempt(self, ref: HubFile, env: HubEnv, progress: ProgressFn | None, events: EventFn | None,
                 describe: dict[str, Any]) -> Path:
        from huggingface_hub import hf_hub_download

        size = self._metadata_size(ref, env)
        total = ref.size or size
        if total:
            _check_space(env.cache_dir, total, ref)
        tracker = _Progress(ref.display, total, progress, self.log_every_s)
        log.info("downloading %s (%s) from %s", ref.display, _size(total) if total else "size unknown", env.endpoint)
        started = time.monotonic()
        try:
            found = hf_hub_download(ref.repo, ref.path, revision=ref.revision, cache_dir=str(env.cache_dir),
                                    endpoint=env.endpoint, token=env.token, tqdm_class=tracker.bar_class())
        except Exception as exc:
            raise _translate(exc, ref, env) from exc
        path = Path(found)
        self._verify(path, ref, env)
        seconds = time.monotonic() - started
        nbytes = path.stat().st_size
        log.info("downloaded %s: %s in %.1f s (%s/s)", ref.display, _size(nbytes), seconds,
                 _size(nbytes / max(seconds, 1e-6)))
        if events is not None:
            events("model_download", {**describe, "repo": ref.repo, "bytes": nbytes, "seconds": round(seconds, 3)})
        return path

    def _metadata_size(self, ref: HubFile, env: HubEnv) -> int | None:
        """One metadata request, without huggingface_hub's retries, so errors are typed and immediate."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        url = hf_hub_url(ref.repo, ref.path, revision=ref.revision, endpoint=env.endpoint)
        try:
            meta = get_hf_file_metadata(url, token=env.token, endpoint=env.endpoint)
        except Exception as exc:
            error = _translate(exc, ref, env)
            if isinstance(error, _Transient):
                error = HubUnavailable(f"could not reach the hub at {env.endpoint} for {ref.display}: {error}")
            raise error from exc
        if meta.commit_hash is None or meta.etag is None:
            raise HubUnavailable(f"{env.endpoint} answered for {ref.display} without the hub's headers "
                                 "(X-Repo-Commit, ETag): is HF_ENDPOINT a Hugging Face hub or a mirror of one?")
        return meta.size


class _Transient(Exception):
    """A failed transfer worth another attempt (truncated, reset, server error); internal to the retry loop."""


class _Both:
    """The thread lock, then the file lock: threads of one process queue cheaply, processes through the file."""

    def __init__(self, thread_lock: threading.Lock, file_lock: Any):
        self.thread_lock, self.file_lock = thread_lock, file_lock

    def __enter__(self) -> None:
        self.thread_lock.acquire()
        try:
            if self.file_lock is not None:
                self.file_lock.acquire()
        except BaseException:
            self.thread_lock.release()
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.file_lock is not None:
                self.file_lock.release()
        finally:
            self.thread_lock.release()


def _check_space(cache_dir: Path, needed: int, ref: HubFile) -> None:
    probe = cache_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    if free < needed:
        raise StorageError(f"no space for {ref.display}: it needs {_size(needed)}, {_size(free)} are free on the "
                           f"volume of the hub cache {cache_dir}; free space there or mount a larger volume as "
                           "HF_HOME", errno.ENOSPC)


def _storage_error(exc: OSError, what: str) -> StorageError:
    return StorageError(f"{what}: {exc.strerror or exc}", exc.errno)


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _translate(exc: Exception, ref: HubFile, env: HubEnv) -> Exception:
    """huggingface_hub's and the transport's exceptions -> ours: the user's mistakes, the hub's faults, storage."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    if isinstance(exc, EngineError):
        return exc
    if isinstance(exc, GatedRepoError) or (isinstance(exc, HfHubHTTPError) and _status(exc) in (401, 403)
                                           and not isinstance(exc, RepositoryNotFoundError)):
        if env.token:
            return HubAccessDenied(f"the token in HF_TOKEN has no access to {ref.repo}: accept the repo's "
                                   f"conditions on its hub page with that account, or use another token")
        return HubAccessDenied(f"{ref.repo} is gated or private: set HF_TOKEN to a token of an account that "
                               "accepted its conditions on the hub")
    if isinstance(exc, RepositoryNotFoundError):
        hint = "" if env.token else "; if it is private, set HF_TOKEN to a token with access"
        return HubNotFound(f"no repo {ref.repo} on {env.endpoint}: check the name{hint}")
    if isinstance(exc, RevisionNotFoundError):
        return HubNotFound(f"{ref.repo} has no revision {ref.revision!r}: use an existing commit, branch or tag")
    if isinstance(exc, RemoteEntryNotFoundError):
        return HubNotFound(f"{ref.repo} has no file {ref.path!r} at revision {ref.revision!r}")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
        return _storage_error(exc, f"writing {ref.display} into the hub cache {env.cache_dir} failed")
    if isinstance(exc, HfHubHTTPError):
        status = _status(exc)
        if status is not None and 400 <= status < 500 and status not in (408, 429):
            return HubNotFound(f"the hub refused {ref.display} with status {status}: {exc}")
        return HubUnavailable(f"the hub at {env.endpoint} answered {status} for {ref.display}")
    if isinstance(exc, LocalEntryNotFoundError):
        if env.offline:
            return HubOffline(f"HF_HUB_OFFLINE is set and {ref.display} is not in the hub cache {env.cache_dir}")
        return HubUnavailable(f"the hub at {env.endpoint} could not be reached for {ref.display}")
    if _is_transport_error(exc) or isinstance(exc, OSError):
        return _Transient(f"{type(exc).__name__}: {exc}")
    return exc


def _is_transport_error(exc: BaseException) -> bool:
    """Connection, timeout and protocol errors of whichever HTTP client huggingface_hub uses."""
    for module in ("httpx2", "httpx", "requests"):
        try:
            client = __import__(module)
        except ImportError:
            continue
        base = getattr(client, "TransportError", None) or getattr(client, "ConnectionError", None)
        if base is not None and isinstance(exc, base):
            return True
    return False
