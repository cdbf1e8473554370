"""The deployment files stay valid and consistent with the services.

- Dockerfiles (parsed as text; no Docker engine here): multi-stage, non-root, health checks, no compilers
  in the final stage, the CUDA base matching the onnxruntime-gpu wheel.
- deploy/docker/grpc_health_check.py against a real gRPC health server in this process.
- deploy/nginx/nginx.conf through the real `nginx -t`.
- docker-compose.yml through `docker-compose config` (or `docker compose config`).
- deploy/k8s/*.yaml: structure, selectors, probes, the inference URL, and the ConfigMap's configs through the
  services' own config parsers.

nginx, docker-compose and kubectl are required: a missing one fails the test with the package to install (Debian:
nginx-light, docker-compose, kubectl) rather than skipping it, so CI cannot go green without these checks.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import pwd
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from compositing_service import config as compositing_config
from inference_service import config as inference_config
from service_common.config_source import apply_overrides, env_overrides

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CONFIGS = DEPLOY / "configs"
K8S = DEPLOY / "k8s"
NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"
COMPOSE_FILE = ROOT / "docker-compose.yml"

INFERENCE_SERVICE = "inference.InferenceService"
COMPOSITING_SERVICE = "compositing.CompositingService"
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|cmake|make|cc|python3(\.\d+)?-dev|libc6-dev)\b")


def _tool_missing(name: str, package: str) -> NoReturn:
    pytest.fail(
        f"{name} is required by this test and was not found: install it (Debian: apt-get install -y {package})",
        pytrace=False,
    )


# --- Dockerfiles ------------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def arg_default(self, name: str) -> str:
        """An ARG's default, wherever it is declared."""
        if name in self.global_args:
            return self.global_args[name]
        for stage in self.stages:
            for args in stage.all("ARG"):
                key, _, value = args.partition("=")
                if key.strip() == name:
                    return value.strip().strip("\"'")
        raise KeyError(name)


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions with their continuation lines joined; `# ...` lines (and the syntax directive) dropped."""
    logical: list[str] = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue
        if line.endswith("\\"):
            current += line[:-1].strip() + " "
            continue
        current += line
        if current.strip():
            logical.append(current.strip())
        current = ""
    assert not current, f"{path.name}: a continuation line runs off the end"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            image = next(p for p in parts if not p.startswith("--"))
            lowered = [p.lower() for p in parts]
            name = parts[lowered.index("as") + 1] if "as" in lowered else None
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m.group(1) or m.group(2)], image)
            stages.append(Stage(base=image, name=name))
        elif not stages:
            assert keyword == "ARG", f"{path.name}: {keyword} before the first FROM"
            key, _, value = args.partition("=")
            global_args[key.strip()] = value.strip().strip("\"'")
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return Dockerfile(global_args, stages)


def resolve_base(dockerfile: Dockerfile, stage: Stage) -> str:
    """The image a stage ultimately starts from (following `FROM <earlier stage>`)."""
    names = {s.name: s for s in dockerfile.stages if s.name}
    while stage.base in names:
        stage = names[stage.base]
    return stage.base


def exec_form(args: str) -> list[str]:
    value = yaml.safe_load(args)
    assert isinstance(value, list), f"expected the exec (JSON) form, got {args!r}"
    return [str(v) for v in value]


def copy_sources(args: str) -> list[str]:
    """The context paths a COPY reads (none for COPY --from=...)."""
    parts = args.split()
    if any(p.startswith("--from") for p in parts):
        return []
    return [p for p in parts if not p.startswith("--")][:-1]


DOCKERFILES = {
    "inference": (DEPLOY / "docker" / "inference.Dockerfile", 50051, INFERENCE_SERVICE),
    "compositing": (DEPLOY / "docker" / "compositing.Dockerfile", 50052, COMPOSITING_SERVICE),
}


@pytest.mark.parametrize("service", sorted(DOCKERFILES))
def test_dockerfile_stages_user_healthcheck_entrypoint(service: str) -> None:
    path, port, service_name = DOCKERFILES[service]
    dockerfile = parse_dockerfile(path)
    final = dockerfile.final

    assert len(dockerfile.stages) >= 2, "multi-stage: a builder and a runtime stage"
    assert any("--from=builder" in args and "/opt/venv" in args for args in final.all("COPY")), (
        "the final stage copies the venv from the builder"
    )

    users = final.all("USER")
    assert users, "the final stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"the final stage runs as {users[-1]}"
    assert user.isdigit(), "a numeric USER lets Kubernetes check runAsNonRoot"

    for args in final.all("RUN"):
        found = COMPILERS.search(args)
        assert not found, f"the final stage installs a build tool ({found.group(0)}): {args}"

    (healthcheck,) = final.all("HEALTHCHECK")
    probe = exec_form(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert probe == ["grpc-health-check", f"127.0.0.1:{port}", service_name]
    assert any(
        "grpc_health_check.py" in args and "/usr/local/bin/grpc-health-check" in args for args in final.all("COPY")
    )

    assert str(port) in final.all("EXPOSE")
    (entrypoint,) = final.all("ENTRYPOINT")
    assert exec_form(entrypoint) == [f"lipsync-{service}"]
    (cmd,) = final.all("CMD")
    assert exec_form(cmd) == ["--config", f"/etc/lipsync/{service}.yaml"]
    assert f"deploy/configs/{service}.yaml /etc/lipsync/{service}.yaml" in final.all("COPY")

    for stage in dockerfile.stages:
        for args in stage.all("COPY"):
            for source in copy_sources(args):
                if source != ".":
                    assert (ROOT / source).exists(), f"{path.name}: COPY {source}: no such file"
                    assert not dockerignored(source), f"{path.name}: COPY {source} is excluded by .dockerignore"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def test_inference_dockerfile_cuda_runtime_and_gpu_wheel() -> None:
    dockerfile = parse_dockerfile(DOCKERFILES["inference"][0])
    base = resolve_base(dockerfile, dockerfile.final)
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-runtime-ubuntu(\d+\.\d+)", base)
    assert match, f"the final stage should start from an nvidia/cuda cuDNN runtime image, not {base}"
    cuda_major = int(match.group(1))

    builder = dockerfile.stage("builder")
    install = " ".join(builder.all("RUN"))
    assert 'pip install ".[gpu]"' in install, "the builder installs the project with the gpu extra"
    assert "pip uninstall -y onnxruntime" in install, "only onnxruntime-gpu may provide the onnxruntime module"
    assert "CUDAExecutionProvider" in install, "the build checks that the CUDA provider is compiled in"

    # onnxruntime-gpu on PyPI: 1.19-1.26 are built for CUDA 12 + cuDNN 9, 1.27 and later for CUDA 13 + cuDNN 9.
    spec = dockerfile.arg_default("ORT_GPU_SPEC")
    lower = re.search(r">=\s*([\d.]+)", spec)
    assert lower, f"ORT_GPU_SPEC should bound the onnxruntime-gpu version from below: {spec!r}"
    expected_cuda = 13 if _version(lower.group(1)) >= (1, 27) else 12
    assert cuda_major == expected_cuda, f"{base} does not match {spec} (built for CUDA {expected_cuda})"

    # The same interpreter in the builder and the final stage: the venv's python links to it.
    assert resolve_base(dockerfile, dockerfile.stage("builder")) == base
    assert "python3.11" in " ".join(dockerfile.stage(dockerfile.final.base).all("RUN"))


def test_compositing_dockerfile_python_slim() -> None:
    dockerfile = parse_dockerfile(DOCKERFILES["compositing"][0])
    for stage in dockerfile.stages:
        assert resolve_base(dockerfile, stage).startswith("python:3.11-slim")
    assert "gpu" not in " ".join(dockerfile.stage("builder").all("RUN"))


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def dockerignored(relative: str) -> bool:
    """Whether .dockerignore drops a context path.

    Docker's rules, close enough for these files: patterns are anchored at the context root, `**/` matches any
    number of folders (none too), a match on a parent folder drops what is inside, the last matching line wins.
    """
    parts = Path(relative).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in dockerignore_patterns():
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        globs = [pattern, pattern.removeprefix("**/")] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(c, g) for c in candidates for g in globs):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_package_and_drops_the_rest() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    needed = ["pyproject.toml", pyproject["project"]["readme"], "deploy/configs/inference.yaml"]
    for path in [*needed, *packages, "deploy/docker/grpc_health_check.py"]:
        assert not dockerignored(path), f".dockerignore drops {path}, which the image build needs"
    for path in [".venv", ".git", "models", "out", "tests", "inference_service/__pycache__/x.pyc"]:
        assert dockerignored(path), f".dockerignore should drop {path}"


# --- the health check script ------------------------------------------------------------------------------------


def load_health_check() -> ModuleType:
    path = DEPLOY / "docker" / "grpc_health_check.py"
    spec = importlib.util.spec_from_file_location("grpc_health_check", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def test_health_check_script(health_server: tuple[str, health.HealthServicer], capsys: pytest.CaptureFixture) -> None:
    address, servicer = health_server
    check = load_health_check()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set(COMPOSITING_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)

    assert check.main([address]) == 0
    assert check.main([address, COMPOSITING_SERVICE]) == 1
    assert "NOT_SERVING" in capsys.readouterr().err
    assert check.main([address, "no.Such"]) == 1  # NOT_FOUND
    assert check.main(["127.0.0.1:1", "--timeout", "2"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


# --- nginx ------------------------------------------------------------------------------------------------------


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if not found:
        _tool_missing("nginx", "nginx-light")
    return str(found)


def _substitute(text: str, pattern: str, replacement: str) -> str:
    new, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert count, f"nginx.conf no longer contains {pattern!r}: update the test's substitutions"
    return new


def test_nginx_conf_directives() -> None:
    text = NGINX_CONF.read_text()
    code = re.sub(r"#.*", "", text)
    upstream = re.search(r"upstream\s+compositing_upstream\s*\{(.*?)\}", code, re.S)
    assert upstream, "an upstream over the compositing replicas"
    assert re.search(r"^\s*server\s+compositing:50052\b", upstream.group(1), re.M)
    assert re.search(r"^\s*keepalive\s+\d+;", upstream.group(1), re.M)
    assert re.search(r"^\s*listen\s+8080\s+http2;", code, re.M)
    assert re.search(r"^\s*grpc_pass\s+grpc://compositing_upstream;", code, re.M)
    body = re.search(r"client_max_body_size\s+(\d+)m;", code)
    assert body and int(body.group(1)) >= 64 + 1, "room for a 64 MiB message plus its frame header"
    for directive in ("grpc_read_timeout", "grpc_send_timeout"):
        minutes = re.search(rf"{directive}\s+(\d+)m;", code)
        assert minutes and int(minutes.group(1)) >= 5, f"{directive} in minutes"
    assert re.search(r"grpc_next_upstream\s+[^;]*\berror\b[^;]*\btimeout\b", code)
    assert re.search(r"grpc_next_upstream_tries\s+\d+;", code)
    assert re.search(r"resolver\s+127\.0\.0\.11\b", code)


@pytest.mark.needs_tools
def test_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    """`nginx -t` with the real binary on a copy of the conf adjusted to this host.

    nginx -t resolves the upstream's host names (compositing exists only on the compose network), switches to
    `user` (the image's nginx user may not exist here) and creates its temp folders (the image's paths may not
    exist or be writable here): the copy points those at 127.0.0.1, the current user and tmp_path. Everything else
    is tested as written.
    """
    nginx = nginx_binary()
    text = NGINX_CONF.read_text()
    text = _substitute(text, r"\bserver\s+compositing:50052\b", "server 127.0.0.1:50052")
    text = _substitute(text, r"/var/cache/nginx", str(tmp_path / "cache"))
    text = _substitute(text, r"^pid\s+\S+;", f"pid {tmp_path / 'nginx.pid'};")
    user = pwd.getpwuid(os.getuid()).pw_name
    text = _substitute(text, r"^user\s+\S+;", f"user {user};" if os.getuid() == 0 else "")
    (tmp_path / "cache").mkdir()  # nginx creates each temp folder, not its parents
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)

    command = [nginx, "-t", "-p", str(tmp_path), "-c", str(conf)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output}"
    assert "test is successful" in output
    assert "[warn]" not in output and "[emerg]" not in output, output


# --- docker compose ---------------------------------------------------------------------------------------------


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    _tool_missing("docker-compose (or the docker compose plugin)", "docker-compose")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The file as `docker-compose config` normalizes it (so what the tool accepted, not just what YAML allows)."""
    command = [*compose_command(), "-f", str(COMPOSE_FILE), "config"]
    # A clean environment: no COMPOSE_* or LIPSYNC_* from the caller changes what is validated.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


@pytest.mark.needs_tools
def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"models", "inference", "compositing", "nginx"}
    assert "models" in compose["volumes"]

    for name in ("models", "inference", "compositing"):
        dockerfile = services[name]["build"]["dockerfile"]
        assert (ROOT / dockerfile).is_file(), f"{name}: {dockerfile} does not exist"

    models = services["models"]
    assert models["image"] == services["compositing"]["image"], "the one-shot runs on the compositing image"
    assert [*models["entrypoint"], *models["command"]] == ["lipsync-models", "--out", "/models"]
    assert any(v.startswith("models:/models") for v in _volumes(models))
    assert models.get("restart", "no") == "no"


def _volumes(service: dict[str, Any]) -> list[str]:
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            out.append(f"{volume['source']}:{volume['target']}")
        else:
            out.append(volume)
    return out


def _healthcheck(service: dict[str, Any]) -> list[str]:
    return service["healthcheck"]["test"]


@pytest.mark.needs_tools
def test_compose_inference_gpu_and_health(compose: dict[str, Any]) -> None:
    inference = compose["services"]["inference"]
    (device,) = inference["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device.get("count") in ("all", 1) or device.get("device_ids")
    assert _healthcheck(inference) == ["CMD", "grpc-health-check", "127.0.0.1:50051", INFERENCE_SERVICE]
    assert inference["depends_on"]["models"]["condition"] == "service_completed_successfully"
    assert any(v.startswith("models:/models") for v in _volumes(inference))


@pytest.mark.needs_tools
def test_compose_compositing_replicas_and_url(compose: dict[str, Any]) -> None:
    compositing = compose["services"]["compositing"]
    assert int(compositing["deploy"]["replicas"]) >= 2
    assert "scale" not in compositing, "docker-compose refuses scale together with deploy.replicas"
    assert compositing["environment"]["LIPSYNC_INFERENCE_SERVER__URL"] == "dns:///inference:50051"
    assert compositing["depends_on"]["inference"]["condition"] == "service_healthy"
    assert compositing["depends_on"]["models"]["condition"] == "service_completed_successfully"
    assert _healthcheck(compositing) == ["CMD", "grpc-health-check", "127.0.0.1:50052", COMPOSITING_SERVICE]
    assert "ports" not in compositing, "replicas are reached through nginx only"
    frames_cache = yaml.safe_load((CONFIGS / "compositing.yaml").read_text())["frames_cache_dir"]
    assert any(v.split(":")[1] == frames_cache for v in _volumes(compositing)), "decoded frames shared by replicas"


@pytest.mark.needs_tools
def test_compose_nginx(compose: dict[str, Any]) -> None:
    nginx = compose["services"]["nginx"]
    assert nginx["image"].startswith("nginx:")
    (port,) = nginx["ports"]
    published = port if isinstance(port, str) else f"{port['published']}:{port['target']}"
    assert published.endswith(":8080")
    (conf,) = [v for v in _volumes(nginx) if v.split(":")[1] == "/etc/nginx/nginx.conf"]
    assert Path(conf.split(":")[0]).resolve() == NGINX_CONF
    assert nginx["depends_on"]["compositing"]["condition"] == "service_healthy"


@pytest.mark.needs_tools
def test_compose_environment_is_read_by_the_services(compose: dict[str, Any], tmp_path: Path) -> None:
    """The LIPSYNC_* variables compose sets are real config keys, applied over the configs baked into the images."""
    services = compose["services"]
    comp = compositing_config.load_config(
        CONFIGS / "compositing.yaml", {"models_root": str(tmp_path)}, environ=services["compositing"]["environment"]
    )
    assert comp.inference_targets == ("dns:///inference:50051",)
    assert comp.max_connection_age_s > 0
    inf = inference_config.load_config(
        CONFIGS / "inference.yaml", {"models_root": str(tmp_path)}, environ=services["inference"]["environment"]
    )
    assert inf.max_connection_age_s > 0 and inf.gpus_required


# --- Kubernetes -------------------------------------------------------------------------------------------------


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for filename, doc in k8s_documents():
        for key in ("apiVersion", "kind", "metadata"):
            assert key in doc, f"{filename}: no {key}"
        assert doc["metadata"].get("name"), f"{filename}: no metadata.name"
        kind_name = (doc["kind"], doc["metadata"]["name"])
        assert kind_name not in out, f"{filename}: {kind_name} defined twice"
        out[kind_name] = doc
    return out


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env", [])}


def test_kustomization_lists_every_manifest(kustomization: dict[str, Any]) -> None:
    listed = kustomization["resources"]
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == files
    assert len(set(listed)) == len(listed)
    assert kustomization["namespace"] == "lipsync"


def test_workload_selectors_match_their_pods(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    workloads = [doc for (kind, _), doc in manifests.items() if kind in {"Deployment", "StatefulSet", "DaemonSet"}]
    assert len(workloads) == 2
    for doc in workloads:
        selector = doc["spec"]["selector"]["matchLabels"]
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert _labels_match(selector, labels), f"{doc['metadata']['name']}: selector {selector} vs labels {labels}"
    for (kind, name), doc in manifests.items():
        if kind in {"Service", "PodDisruptionBudget"}:
            selector = doc["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            assert any(_labels_match(selector, w["spec"]["template"]["metadata"]["labels"]) for w in workloads), (
                f"{kind} {name} selects no pods"
            )


def test_inference_deployment_gpu_probes_and_grace(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    deployment = manifests["Deployment", "inference"]
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment, "inference")
    resources = container["resources"]
    assert str(resources["limits"]["nvidia.com/gpu"]) == "1"
    assert str(resources["requests"].get("nvidia.com/gpu", "1")) == "1"
    assert {"name": "grpc", "containerPort": 50051, "protocol": "TCP"} in container["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 50051, "service": INFERENCE_SERVICE}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "time for the models to load"
    assert _env(container)["LIPSYNC_SERVER__MAX_CONNECTION_AGE_SECONDS"] == "300"
    assert container["args"] == ["--config", "/etc/lipsync/inference.yaml"]
    _check_grace(
        pod, container, _configmap_config(manifests, "inference.yaml"), deployment["spec"]["template"]["metadata"]
    )
    _check_volumes(pod, container, manifests)


def _configmap_config(manifests: dict[tuple[str, str], dict[str, Any]], key: str) -> dict[str, Any]:
    return yaml.safe_load(manifests["ConfigMap", "lipsync-config"]["data"][key])


def _check_grace(pod: dict[str, Any], container: dict[str, Any], config: dict[str, Any], meta: dict) -> None:
    grace = float(config["server"]["grace_seconds"]) + float(config["server"].get("shutdown_delay_seconds", 0))
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > grace + float(pre_stop[1]), "the grace period must cover all"
    # Prometheus finds the metrics port the config serves.
    annotations = meta.get("annotations") or {}
    metrics = config["metrics"]
    assert metrics["enabled"] and annotations.get("prometheus.io/port") == str(metrics["port"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == metrics["port"]


def _check_volumes(pod: dict[str, Any], container: dict[str, Any], manifests: dict) -> None:
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    models = volumes[mounts["/models"]["name"]]
    assert mounts["/models"].get("readOnly") is True
    assert ("PersistentVolumeClaim", models["persistentVolumeClaim"]["claimName"]) in manifests
    config = volumes[mounts["/etc/lipsync"]["name"]]["configMap"]
    configmap = manifests["ConfigMap", config["name"]]
    assert all(item["key"] in configmap["data"] for item in config["items"])
    assert "/tmp" in mounts, "frames_cache_dir and CUDA's cache need a writable /tmp (read-only root filesystem)"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_inference_service_is_headless(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    service = manifests["Service", "inference"]
    assert service["spec"]["clusterIP"] == "None"
    pod_labels = manifests["Deployment", "inference"]["spec"]["template"]["metadata"]["labels"]
    assert _labels_match(service["spec"]["selector"], pod_labels)
    (port,) = service["spec"]["ports"]
    assert port["port"] == 50051 and port["targetPort"] in ("grpc", 50051)


def test_compositing_deployment_url_probes_and_volumes(
    manifests: dict[tuple[str, str], dict[str, Any]], kustomization: dict[str, Any]
) -> None:
    deployment = manifests["Deployment", "compositing"]
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment, "compositing")
    env = _env(container)
    headless = manifests["Service", "inference"]
    namespace = kustomization["namespace"]
    expected = (
        f"dns:///{headless['metadata']['name']}.{namespace}.svc.cluster.local:{headless['spec']['ports'][0]['port']}"
    )
    assert env["LIPSYNC_INFERENCE_SERVER__URL"] == expected
    assert _configmap_config(manifests, "compositing.yaml")["inference_server"]["url"] == expected
    assert env["LIPSYNC_SERVER__MAX_CONNECTION_AGE_SECONDS"] == "300"
    assert container["args"] == ["--config", "/etc/lipsync/compositing.yaml"]

    assert {"name": "grpc", "containerPort": 50052, "protocol": "TCP"} in container["ports"]
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"] == {"port": 50052, "service": COMPOSITING_SERVICE}, probe
    # Health turns NOT_SERVING while inference is unreachable: that must not make the kubelet restart replicas.
    assert "grpc" not in container["livenessProbe"]
    assert container["resources"]["requests"]["cpu"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    _check_grace(
        pod, container, _configmap_config(manifests, "compositing.yaml"), deployment["spec"]["template"]["metadata"]
    )
    _check_volumes(pod, container, manifests)


def test_compositing_hpa_service_and_ingress(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    hpa = manifests["HorizontalPodAutoscaler", "compositing"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "compositing"}
    assert ("Deployment", "compositing") in manifests
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"

    service = manifests["Service", "compositing"]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert port["name"] == "grpc" and port["port"] == 50052 and port["appProtocol"] == "kubernetes.io/h2c"

    ingress = manifests["Ingress", "lipsync"]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert ingress["spec"]["tls"], "ingress-nginx serves HTTP/2 (and so gRPC) to clients only over TLS"
    backends = [p["backend"]["service"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert backends == [{"name": "compositing", "port": {"name": "grpc"}}]


def test_models_job_writes_the_pvc_the_pods_read(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    job = manifests["Job", "lipsync-models"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "lipsync-models --out /models" in " ".join(container["command"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
    assert not mount.get("readOnly")
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    pvc = manifests["PersistentVolumeClaim", claim]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    marker = re.search(r"touch (\S+)", " ".join(container["command"])).group(1)
    for name in ("inference", "compositing"):
        (init,) = manifests["Deployment", name]["spec"]["template"]["spec"]["initContainers"]
        assert marker in " ".join(init["command"]), f"{name} waits for the models job's marker"


def test_images_are_the_ones_built_here(
    manifests: dict[tuple[str, str], dict[str, Any]], kustomization: dict[str, Any]
) -> None:
    renamed = {image["name"] for image in kustomization["images"]}
    assert renamed == {"lipsync-inference", "lipsync-compositing"}
    for doc in manifests.values():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            assert container["image"].split(":")[0] in renamed, container["image"]


@pytest.mark.needs_tools
def test_kustomize_build(kustomization: dict[str, Any]) -> None:
    """`kubectl kustomize` of deploy/k8s; make test installs kubectl, so a missing one fails (never a skip)."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl not found: install it (make system-deps-test does)"
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert len(built) == len(k8s_documents())
    for doc in built:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kustomization["namespace"], doc["metadata"]["name"]
    images = {image["name"]: f"{image['newName']}:{image['newTag']}" for image in kustomization["images"]}
    for doc in built:
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            assert container["image"] in images.values(), container["image"]


# --- the ConfigMap's configs through the services' parsers -----------------------------------------------------


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, child in value.items():
        out.update(_flatten(child, f"{prefix}.{key}" if prefix else str(key)))
    return out


CONFIGMAP_CHANGES = {
    "inference.yaml": {"gpus.required"},
    "compositing.yaml": {
        "server.composite_threads",
        "inference_server.url",
    },
}


@pytest.mark.parametrize("key", sorted(CONFIGMAP_CHANGES))
def test_configmap_configs_track_deploy_configs(manifests: dict[tuple[str, str], dict[str, Any]], key: str) -> None:
    """The ConfigMap is deploy/configs/<key> with only the Kubernetes-specific keys changed."""
    embedded = _flatten(_configmap_config(manifests, key))
    reference = _flatten(yaml.safe_load((CONFIGS / key).read_text()))
    changed = {k for k in embedded.keys() | reference.keys() if embedded.get(k, object()) != reference.get(k, object())}
    assert changed == CONFIGMAP_CHANGES[key]


def _parse(
    module: ModuleType, manifests: dict[tuple[str, str], dict[str, Any]], key: str, tmp_path: Path, env: dict[str, str]
) -> Any:
    raw = _configmap_config(manifests, key)
    raw["models_root"] = str(tmp_path)
    apply_overrides(raw, env_overrides(env))
    return module.parse_config(raw, tmp_path)


def test_configmap_inference_config_parses(
    manifests: dict[tuple[str, str], dict[str, Any]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = _env(_container(manifests["Deployment", "inference"], "inference"))
    config = _parse(inference_config, manifests, "inference.yaml", tmp_path, env)
    assert not [r for r in caplog.records if "unknown key" in r.getMessage()]
    assert config.port == 50051 and config.gpus_required
    assert config.max_connection_age_s == 300
    assert config.models["demo"].model_path == (tmp_path / "demo" / "model.onnx").resolve()
    assert config.models["demo"].preload


def test_configmap_compositing_config_parses(
    manifests: dict[tuple[str, str], dict[str, Any]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = _env(_container(manifests["Deployment", "compositing"], "compositing"))
    config = _parse(compositing_config, manifests, "compositing.yaml", tmp_path, env)
    assert not [r for r in caplog.records if "unknown key" in r.getMessage()]
    assert config.port == 50052
    assert config.inference_targets == ("dns:///inference.lipsync.svc.cluster.local:50051",)
    assert config.max_connection_age_s == 300
    assert config.composite_threads == 2
    assert config.models["demo"].background == (tmp_path / "avatar" / "background.mp4").resolve()
