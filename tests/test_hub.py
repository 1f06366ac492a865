"""Hub downloads against a local fake hub (tests/fake_hub.py): registry entries and hf:// references, one download
for many concurrent callers (threads and processes), truncated and corrupt transfers, sha256 checks, offline mode,
gated repos, missing revisions, a hub that is down, no space left, interrupts, and the allow-list."""
from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from engine.errors import BadRequest, Forbidden, Interrupted, NotFound, StorageError
from engine.hub import (DownloadFailed, Hub, HubAccessDenied, HubFile, HubNotFound, HubOffline, HubUnavailable,
                        IntegrityError)
from engine.known_models import KnownModel, Registry
from engine.modelfiles import ModelFiles
from tests.fake_hub import FakeHub

REPO, FILE = "test-org/tiny-models", "weights/tiny.safetensors"
ROOT = Path(__file__).resolve().parents[1]


def blob(seed: int = 0, size: int = 200_000) -> bytes:
    return hashlib.shake_256(f"blob{seed}".encode()).digest(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def hub():
    with FakeHub() as fake:
        yield fake


@pytest.fixture
def hf_home(tmp_path, monkeypatch, hub) -> Path:
    """huggingface_hub's environment pointed at the fake hub and a fresh cache, read at call time by engine.hub."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(home))
    for name in ("HF_HUB_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return home


def files_with(data: bytes, tmp_path: Path, retries: int = 3, allow: str = "", **entry) -> ModelFiles:
    fields = dict(name="tiny.safetensors", folder="checkpoints", repo=REPO, path=FILE, revision="main",
                  sha256=sha(data), size=len(data))
    fields.update(entry)
    registry = Registry([KnownModel(**fields)])
    return ModelFiles(tmp_path / "models", registry=registry, hub=Hub(retries=retries, backoff_s=0.01),
                      hub_allow=allow)


def leftovers(home: Path) -> list[Path]:
    """Partial files anywhere in the cache: a failed transfer must leave none."""
    return [p for p in home.rglob("*") if p.name.endswith(".incomplete")]


def snapshot_files(home: Path) -> list[Path]:
    return [p for p in home.rglob("snapshots/*/**/*") if p.is_file()]


def test_registry_entry_downloads_into_the_hub_cache_once(hub, hf_home, tmp_path):
    data = blob()
    hub.publish(REPO, FILE, data)
    events, progress = [], []
    files = files_with(data, tmp_path)
    files.events = lambda event, payload: events.append((event, payload))
    path = files.find("checkpoints", "tiny.safetensors", progress=lambda done, total: progress.append((done, total)))
    assert path.read_bytes() == data
    assert hf_home in path.parents  # in huggingface_hub's cache under HF_HOME, not in the model folder
    assert hub.gets(REPO, FILE) == 1
    assert progress[-1] == (len(data), len(data))
    assert events == [("model_download", {"folder": "checkpoints", "name": "tiny.safetensors", "repo": REPO,
                                          "bytes": len(data), "seconds": events[0][1]["seconds"]})]
    before = hub.requests
    assert files.find("checkpoints", "tiny.safetensors") == path  # cached and verified: no request at all
    assert hub.requests == before and len(events) == 1


def test_hf_reference_with_revision(hub, hf_home, tmp_path):
    hub.publish("someone/loras", "styles/a.safetensors", blob(1))
    commit = hub.publish("someone/loras", "styles/a.safetensors", blob(2), revision="v2")
    files = ModelFiles(tmp_path / "models", hub=Hub(backoff_s=0.01), hub_allow="someone")
    files.check("loras", "hf://someone/loras/styles/a.safetensors@v2")
    assert files.find("loras", "hf://someone/loras/styles/a.safetensors@v2").read_bytes() == blob(2)
    assert files.find("loras", "hf://someone/loras/styles/a.safetensors").read_bytes() == blob(1)
    assert files.find("loras", f"hf://someone/loras/styles/a.safetensors@{commit}").read_bytes() == blob(2)
    with pytest.raises(BadRequest, match="not a hub reference"):
        files.check("loras", "hf://someone/loras/../x.safetensors")
    with pytest.raises(BadRequest):
        files.check("loras", "hf://someone/loras")


def test_allow_list_refuses_before_any_request(hub, hf_home, tmp_path):
    hub.publish("someone/loras", "a.safetensors", blob())
    for allow in ("", "other-org", "someone/other-repo"):
        files = ModelFiles(tmp_path / "models", hub=Hub(backoff_s=0.01), hub_allow=allow)
        with pytest.raises(Forbidden, match="COMFY_ENDPOINT_HUB_ALLOW"):
            files.check("loras", "hf://someone/loras/a.safetensors")
        with pytest.raises(Forbidden):
            files.find("loras", "hf://someone/loras/a.safetensors")
    assert hub.requests == 0  # the fake hub saw nothing
    files = ModelFiles(tmp_path / "models", hub=Hub(backoff_s=0.01), hub_allow=" Someone/LORAS ")
    assert files.find("loras", "hf://someone/loras/a.safetensors").read_bytes() == blob()


def test_eight_threads_cause_one_download(hub, hf_home, tmp_path):
    data = blob(size=1_000_000)
    hub.publish(REPO, FILE, data)
    hub.fault(REPO, FILE, chunk_delay_s=0.02)  # ~0.3 s transfer, so every thread arrives while it runs
    files = files_with(data, tmp_path)
    start = threading.Barrier(8)

    def one(_):
        start.wait()
        return files.find("checkpoints", "tiny.safetensors")

    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(one, range(8)))
    assert len(set(paths)) == 1 and paths[0].read_bytes() == data
    assert hub.gets(REPO, FILE) == 1


def test_two_processes_cause_one_download(hub, hf_home, tmp_path):
    data = blob(size=1_000_000)
    hub.publish(REPO, FILE, data)
    hub.fault(REPO, FILE, chunk_delay_s=0.05)  # ~0.8 s transfer: longer than the second process takes to start
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from engine.hub import Hub, HubFile
        ref = HubFile({REPO!r}, {FILE!r}, sha256={sha(data)!r}, size={len(data)})
        print(Hub(retries=1).fetch(ref))
    """)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1 and Path(paths.pop()).read_bytes() == data
    assert hub.gets(REPO, FILE) == 1


def test_truncated_transfer_is_resumed_and_never_looks_complete(hub, hf_home, tmp_path):
    data = blob()
    hub.publish(REPO, FILE, data)
    hub.fault(REPO, FILE, truncate_first=1)  # the connection closes halfway through the first GET
    files = files_with(data, tmp_path)
    assert files.find("checkpoints", "tiny.safetensors").read_bytes() == data
    assert hub.gets(REPO, FILE) == 2 and not leftovers(hf_home)


def test_short_transfer_is_retried_then_reported(hub, hf_home, tmp_path):
    data = blob()
    hub.publish(REPO, FILE, data)
    hub.fault(REPO, FILE, short_first=1)  # half the bytes with a Content-Length that says so
    files = files_with(data, tmp_path, sha256=None, size=None)  # only the hub's size can catch it
    assert files.find("checkpoints", "tiny.safetensors").read_bytes() == data
    assert hub.gets(REPO, FILE) == 2

    other = "weights/other.safetensors"  # other bytes: the same bytes would reuse the cached blob
    hub.publish(REPO, other, blob(3))
    hub.fault(REPO, other, short_first=10)
    files = files_with(blob(3), tmp_path, retries=2, name="other.safetensors", path=other, sha256=None, size=None)
    with pytest.raises(DownloadFailed, match=f"{REPO}/{other}@main after 2 attempt") as error:
        files.find("checkpoints", "other.safetensors")
    assert "retry later" in str(error.value)
    assert hub.gets(REPO, other) == 2
    assert not leftovers(hf_home)
    assert not [p for p in snapshot_files(hf_home) if p.name == "other.safetensors"]  # nothing looks complete


def test_wrong_sha256_is_retried_then_reported(hub, hf_home, tmp_path):
    data = blob()
    hub.publish(REPO, FILE, data)
    hub.fault(REPO, FILE, corrupt_first=1)
    files = files_with(data, tmp_path)
    assert files.find("checkpoints", "tiny.safetensors").read_bytes() == data
    assert hub.gets(REPO, FILE) == 2

    hub.publish(REPO, "weights/bad.safetensors", blob(4))
    hub.fault(REPO, "weights/bad.safetensors", corrupt_first=10)
    files = files_with(blob(4), tmp_path, retries=2, name="bad.safetensors", path="weights/bad.safetensors")
    with pytest.raises(IntegrityError, match="sha256") as error:
        files.find("checkpoints", "bad.safetensors")
    assert REPO in str(error.value) and hub.gets(REPO, "weights/bad.safetensors") == 2
    assert not [p for p in snapshot_files(hf_home) if p.name == "bad.safetensors"]
    assert not leftovers(hf_home)


def test_corrupt_cached_file_is_replaced(hub, hf_home, tmp_path):
    data = blob()
    hub.publish(REPO, FILE, data)
    files = files_with(data, tmp_path)
    path = files.find("checkpoints", "tiny.safetensors")
    blob_path = path.resolve()
    os.chmod(blob_path, 0o644)
    blob_path.write_bytes(b"\0" + data[1:])  # bit rot on the volume: same size, other bytes
    assert files.find("checkpoints", "tiny.safetensors").read_bytes() == data
    assert hub.gets(REPO, FILE) == 2


def test_offline_mode_serves_from_a_populated_cache(hub, hf_home, tmp_path, monkeypatch):
    data = blob()
    hub.publish(REPO, FILE, data)
    files = files_with(data, tmp_path)
    path = files.find("checkpoints", "tiny.safetensors")
    # a new process with the same volume: verification markers are kept, the network is off and the hub gone
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.down = True
    before = hub.requests
    files = files_with(data, tmp_path)
    files.check("checkpoints", "tiny.safetensors")
    assert files.find("checkpoints", "tiny.safetensors") == path
    for marker in (hf_home / "hub" / ".comfy-endpoint" / "verified").iterdir():
        marker.unlink()  # not verified yet: hashed locally, still no network
    assert files.find("checkpoints", "tiny.safetensors") == path
    assert hub.requests == before
    missing = files_with(data, tmp_path, name="absent.safetensors", path="weights/absent.safetensors")
    with pytest.raises(NotFound, match="HF_HUB_OFFLINE"):
        missing.check("checkpoints", "absent.safetensors")
    with pytest.raises(HubOffline, match="HF_HUB_OFFLINE"):
        missing.find("checkpoints", "absent.safetensors")
    assert hub.requests == before


def test_gated_repo_needs_a_token(hub, hf_home, tmp_path, monkeypatch):
    data = blob()
    hub.publish(REPO, FILE, data)
    hub.require_token(REPO, "hf_right")
    files = files_with(data, tmp_path)
    with pytest.raises(HubAccessDenied, match="set HF_TOKEN") as error:
        files.find("checkpoints", "tiny.safetensors")
    assert isinstance(error.value, BadRequest) and REPO in str(error.value)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(HubAccessDenied, match="token in HF_TOKEN has no access"):
        files.find("checkpoints", "tiny.safetensors")
    assert hub.gets(REPO, FILE) == 0  # refused on the metadata request, not retried
    monkeypatch.setenv("HF_TOKEN", "hf_right")
    assert files.find("checkpoints", "tiny.safetensors").read_bytes() == data


@pytest.mark.parametrize("entry, message", [
    ({"revision": "v9"}, "has no revision 'v9'"),
    ({"path": "weights/nope.safetensors"}, "has no file 'weights/nope.safetensors'"),
    ({"repo": "test-org/nope"}, "no repo test-org/nope"),
])
def test_missing_revision_file_or_repo_is_the_users_mistake(hub, hf_home, tmp_path, entry, message):
    hub.publish(REPO, FILE, blob())
    files = files_with(blob(), tmp_path, **entry)
    with pytest.raises(HubNotFound, match=message) as error:
        files.find("checkpoints", "tiny.safetensors")
    assert isinstance(error.value, BadRequest)
    assert hub.requests == 1  # one metadata request, no retries, no download


def test_hub_down_is_retried_with_backoff_then_reported(hub, hf_home, tmp_path):
    hub.publish(REPO, FILE, blob())
    hub.down = True
    files = files_with(blob(), tmp_path, retries=3)
    with pytest.raises(HubUnavailable, match="after 3 attempt") as error:
        files.find("checkpoints", "tiny.safetensors")
    assert not isinstance(error.value, BadRequest) and "retry later" in str(error.value)
    assert hub.requests == 3


def test_unreachable_hub(hf_home, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    files = files_with(blob(), tmp_path, retries=2)
    with pytest.raises(HubUnavailable, match="127.0.0.1:9"):
        files.find("checkpoints", "tiny.safetensors")


def test_server_errors_during_transfer_are_retried(hub, hf_home, tmp_path):
    data = blob()
    hub.publish(REPO, FILE, data)
    hub.fault(REPO, FILE, fail_first=2)
    assert files_with(data, tmp_path).find("checkpoints", "tiny.safetensors").read_bytes() == data
    assert hub.gets(REPO, FILE) == 3


def test_no_space_left_writes_nothing(hub, hf_home, tmp_path):
    hub.publish(REPO, FILE, blob())
    hub.fault(REPO, FILE, advertised_size=1 << 60)  # an exabyte: more than any disk
    files = files_with(blob(), tmp_path, sha256=None, size=None)
    with pytest.raises(StorageError, match="no space") as error:
        files.find("checkpoints", "tiny.safetensors")
    assert error.value.errno == errno.ENOSPC
    assert hub.gets(REPO, FILE) == 0
    assert not [p for p in hf_home.rglob("*") if p.is_file() and "blobs" in p.parts or p.suffix == ".incomplete"]


def test_interrupt_stops_the_transfer_and_keeps_nothing(hub, hf_home, tmp_path):
    data = blob(size=1_000_000)
    hub.publish(REPO, FILE, data)
    hub.fault(REPO, FILE, chunk_delay_s=0.01)
    files = files_with(data, tmp_path)

    def interrupt(done, total):
        if done:
            raise Interrupted("interrupted")

    with pytest.raises(Interrupted):
        files.find("checkpoints", "tiny.safetensors", progress=interrupt)
    assert not leftovers(hf_home) and not snapshot_files(hf_home)
    assert files.find("checkpoints", "tiny.safetensors").read_bytes() == data  # the lock was released


def test_cache_location_follows_hf_hub_cache(hub, hf_home, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    hub.publish(REPO, FILE, blob())
    path = Hub().fetch(HubFile(REPO, FILE))
    assert (tmp_path / "elsewhere") in path.parents


def test_concurrent_callers_wait_for_verification(hub, hf_home, tmp_path):
    """The first transfer is corrupt: every waiting thread must get the verified second one, and no thread may
    start a download of its own (huggingface_hub's lock alone lets waiters take the file before it is checked)."""
    data = blob(size=1_000_000)
    hub.publish(REPO, FILE, data)
    hub.fault(REPO, FILE, chunk_delay_s=0.01, corrupt_first=1)
    files = files_with(data, tmp_path)
    start = threading.Barrier(8)

    def one(_):
        start.wait()
        return files.find("checkpoints", "tiny.safetensors").read_bytes() == data

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one, range(8)))
    assert hub.gets(REPO, FILE) == 2
