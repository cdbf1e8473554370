"""Start, watch and stop the local cluster: inference servers, compositing replicas, nginx (and the browser gateway).

Everything listens on loopback, on free ports except the public one; every
part is a child process started from its console script, with its log and the
nginx config in one private folder that is removed on stop. A part that fails
to start stops everything already started, and the error says which part and
why (with the end of its log).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from service_common.processes import ServiceProcess, free_port, wait_http, wait_serving
from shared_proto import compositing_pb2, compositing_pb2_grpc

from . import nginx

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """A part of the cluster could not start; the message names it and says why."""


@dataclass
class ClusterSpec:
    models_dir: Path
    port: int = 8080
    host: str = "127.0.0.1"
    replicas: int = 2
    inference_servers: int = 1
    inference_overrides: list[str] = field(default_factory=list)
    compositing_overrides: list[str] = field(default_factory=list)
    startup_timeout: float = 180.0
    # The browser viewer (lipsync-gateway) on this public port, in front of nginx; None: no gateway.
    gateway_port: int | None = None
    gateway_args: list[str] = field(default_factory=list)  # more lipsync-gateway options, e.g. --sample-clip FILE


@dataclass
class Part:
    name: str
    process: ServiceProcess

    @property
    def pid(self) -> int:
        return self.process.process.pid


class Cluster:
    def __init__(self, spec: ClusterSpec, workdir: Path | None = None) -> None:
        self.spec = spec
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="lipsync-cluster-"))
        self._own_workdir = workdir is None
        self.inference: list[Part] = []
        self.replicas: list[Part] = []
        self.nginx: Part | None = None
        self.gateway: Part | None = None
        self.bin_dir = Path(sys.executable).parent
        self._replica_count = 0  # replicas started so far: names stay unique across restarts
        self._nginx_binary = ""

    @property
    def address(self) -> str:
        return f"{self.spec.host}:{self.spec.port}"

    @property
    def gateway_url(self) -> str | None:
        """The viewer's address (``http://HOST:PORT/``) when the cluster has a gateway."""
        return None if self.spec.gateway_port is None else f"http://{self.spec.host}:{self.spec.gateway_port}/"

    def _start(self, name: str, argv: list[str], port: int, timeout: float) -> Part:
        log.info("starting %s on 127.0.0.1:%d", name, port)
        process = ServiceProcess(argv, port, self.workdir / f"{name.replace(' ', '-')}.log")
        try:
            process.wait_serving(timeout)
        except RuntimeError as exc:
            raise ClusterError(f"{name} failed to start: {exc}") from None
        return Part(name, process)

    def _start_inference(self, name: str, port: int) -> Part:
        argv = [
            str(self.bin_dir / "lipsync-inference"),
            "--config",
            str(self.spec.models_dir.resolve() / "inference.yaml"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        for override in self.spec.inference_overrides:
            argv += ["--set", override]
        return self._start(name, argv, port, self.spec.startup_timeout)

    def _start_replica(self) -> Part:
        self._replica_count += 1
        port = free_port()
        argv = [
            str(self.bin_dir / "lipsync-compositing"),
            "--config",
            str(self.spec.models_dir.resolve() / "compositing.yaml"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--inference-url",
            ",".join(part.process.address for part in self.inference),
            "--set",
            f"frames_cache_dir={self.workdir / 'frames'}",
        ]
        for override in self.spec.compositing_overrides:
            argv += ["--set", override]
        return self._start(f"compositing {self._replica_count}", argv, port, self.spec.startup_timeout)

    def start(self) -> Cluster:
        models = self.spec.models_dir.resolve()
        for config in ("inference.yaml", "compositing.yaml"):
            if not (models / config).is_file():
                raise ClusterError(f"models: {models / config} is missing (run `lipsync-models --out {models}`)")
        binary = nginx.find_nginx()
        if binary is None:
            raise ClusterError(nginx.install_hint())
        try:
            for i in range(self.spec.inference_servers):
                self.inference.append(self._start_inference(f"inference {i + 1}", free_port()))
            for _ in range(self.spec.replicas):
                self.replicas.append(self._start_replica())
            self._start_nginx(binary)
            if self.spec.gateway_port is not None:
                self._start_gateway()
        except BaseException:
            self.stop()
            raise
        self._write_state()
        return self

    def _write_nginx_config(self) -> Path:
        prefix = self.workdir / "nginx"
        upstreams = [part.process.address for part in self.replicas]
        (prefix / "nginx.conf").write_text(nginx.render(prefix, self.spec.host, self.spec.port, upstreams))
        return prefix

    def _start_nginx(self, binary: str) -> None:
        prefix = self.workdir / "nginx"
        nginx.prepare_prefix(prefix)
        self._write_nginx_config()
        process = ServiceProcess(nginx.command(binary, prefix), self.spec.port, self.workdir / "nginx.log")
        part = Part("nginx", process)
        self.nginx = part
        try:
            wait_serving(self.address, 30, process.process)
        except (RuntimeError, TimeoutError) as exc:
            errors = (
                (prefix / "error.log").read_text(errors="replace")[-1500:] if (prefix / "error.log").exists() else ""
            )
            output = (self.workdir / "nginx.log").read_text(errors="replace")[-1500:]
            raise ClusterError(f"nginx failed to start on {self.address}: {exc}\n{output}{errors}") from None

    def _start_gateway(self) -> None:
        port = self.spec.gateway_port
        assert port is not None
        argv = [
            str(self.bin_dir / "lipsync-gateway"),
            "--host",
            self.spec.host,
            "--port",
            str(port),
            "--server",
            self.address,
            *self.spec.gateway_args,
        ]
        log.info("starting gateway on %s:%d", self.spec.host, port)
        log_path = self.workdir / "gateway.log"
        process = ServiceProcess(argv, port, log_path)
        self.gateway = Part("gateway", process)
        try:
            wait_http(f"{self.gateway_url}healthz", 60, process.process)
        except (RuntimeError, TimeoutError) as exc:
            output = log_path.read_text(errors="replace")[-2000:]
            raise ClusterError(f"gateway failed to start on {self.spec.host}:{port}: {exc}\n{output}") from None

    # -- changes under load: drain before stop -------------------------------------------------------------

    def reload_nginx(self, timeout: float = 60.0) -> None:
        """Send nginx the current replica list and wait until the workers of the old list have exited: from then
        on no call reaches a replica that left the list (the old workers finish the calls they hold first)."""
        assert self.nginx is not None
        master = self.nginx.pid
        old_workers = nginx.workers(master)
        self._write_nginx_config()
        os.kill(master, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while set(nginx.workers(master)) & set(old_workers):
            if time.monotonic() > deadline:
                raise ClusterError(f"nginx: the old workers {old_workers} still run {timeout:.0f} s after the reload")
            time.sleep(0.05)
        self._write_state()

    def add_replica(self) -> Part:
        """A new compositing replica, serving, then in nginx's list."""
        part = self._start_replica()
        self.replicas.append(part)
        self.reload_nginx()
        log.info("%s joined nginx's upstream", part.name)
        return part

    def remove_replica(self, part: Part) -> int:
        """Out of nginx's list first (reload), then SIGTERM: nothing new reaches it and the calls it holds finish
        within its grace period. Returns its exit code."""
        self.replicas.remove(part)
        self.reload_nginx()
        code = part.process.stop(timeout=60)
        log.info("%s left nginx's upstream and stopped (exit %s)", part.name, code)
        self._write_state()
        return code

    def restart_inference(self, part: Part) -> Part:
        """Stop an inference server and start a new one on the same address (the replicas' target lists stay
        valid). The replicas retry its refused or cancelled calls on the other servers."""
        index = self.inference.index(part)
        port = part.process.port
        code = part.process.stop(timeout=60)
        log.info("%s stopped (exit %s); starting it again on port %d", part.name, code, port)
        self.inference[index] = self._start_inference(part.name, port)
        self._wait_replicas_reach(len(self.inference))
        self._write_state()
        return self.inference[index]

    def _wait_replicas_reach(self, servers: int, timeout: float = 60.0) -> None:
        """Until every replica reaches ``servers`` inference servers again: a replica's channel to a restarted
        server reconnects after a backoff, and stopping the next server before then would leave it none."""
        deadline = time.monotonic() + timeout
        for part in self.replicas:
            while reachable_from(part.process.address) < servers:
                if time.monotonic() > deadline:
                    raise ClusterError(f"{part.name} does not reach {servers} inference servers in {timeout:.0f} s")
                time.sleep(0.1)

    def rolling_restart(self) -> list[str]:
        """Every replica replaced one by one (a new one joins before the old one leaves), then every inference
        server restarted one by one when there are two or more. Returns what was done, in order."""
        done = []
        for old in list(self.replicas):
            new = self.add_replica()
            self.remove_replica(old)
            done.append(f"{old.name} -> {new.name}")
        if len(self.inference) > 1:
            for part in list(self.inference):
                self.restart_inference(part)
                done.append(f"{part.name} restarted")
        else:
            done.append("inference not restarted: with one server its restart would refuse calls (run two)")
        return done

    def parts(self) -> list[Part]:
        optional = [part for part in (self.nginx, self.gateway) if part is not None]
        return [*self.inference, *self.replicas, *optional]

    def _write_state(self) -> None:
        state = {
            "supervisor_pid": os.getpid(),
            "address": self.address,
            "workdir": str(self.workdir),
            "parts": {part.name: {"pid": part.pid, "address": part.process.address} for part in self.parts()},
        }
        (self.workdir / "cluster.json").write_text(json.dumps(state, indent=2))

    def dead_parts(self) -> list[str]:
        return [part.name for part in self.parts() if part.process.process.poll() is not None]

    def stop(self) -> None:
        """The gateway and nginx first (no new calls), then the replicas, then inference; then the private folder."""
        for part in reversed(self.parts()):
            code = part.process.stop(timeout=30)
            log.info("stopped %s (exit %s)", part.name, code)
        self.inference, self.replicas, self.nginx, self.gateway = [], [], None, None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def reachable_from(replica: str) -> int:
    """The inference servers a compositing replica reaches now (its Health), 0 when it does not answer."""
    with grpc.insecure_channel(replica) as channel:
        stub = compositing_pb2_grpc.CompositingServiceStub(channel)
        try:
            return stub.Health(compositing_pb2.HealthRequest(), timeout=5).inference_servers_reachable
        except grpc.RpcError:
            return 0


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False
