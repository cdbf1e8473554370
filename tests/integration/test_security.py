"""TLS on both hops (mutual TLS towards inference), token auth, admin-only management, rate and session limits."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from certs import make_pki
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import ServerThread, make_compositing_config, make_config, wait_until

from lipsync_client import LipsyncClient, LipsyncError
from lipsync_protocol.channels import ClientTls
from service_common.processes import free_port
from shared_proto import compositing_pb2 as pb
from shared_proto import compositing_pb2_grpc, inference_pb2_grpc
from shared_proto import inference_pb2 as ipb

WINDOW = np.full((32, 16, 16), 0.7, np.float32).tobytes()
ADMIN = "admin-token-0123456789"
ALICE = "alice-token-abcdefghij"
ALICE_RPS, ALICE_BURST = 5, 5  # alice's rate limit: a bucket of 5 requests, refilled at 5 a second


def composite_request(batch: int = 1) -> pb.CompositeBatchRequest:
    return pb.CompositeBatchRequest(model_id="demo", audio_features=WINDOW, batch_size=batch)


def tls_overrides(pki, *, mutual: bool) -> dict:
    out = {
        "server.plaintext": False,
        "server.tls.cert_file": str(pki.server_cert),
        "server.tls.key_file": str(pki.server_key),
    }
    if mutual:
        out["server.tls.client_ca_file"] = str(pki.ca)
    return out


def test_tls_on_both_hops_with_mutual_tls_to_inference(models_dir: Path, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    probe_port = free_port()
    inference = ServerThread(
        make_config(models_dir, **tls_overrides(pki, mutual=True), **{"server.health_port": probe_port})
    )
    compositing = None
    try:
        assert inference.running.tls
        # Probes that cannot speak TLS (Kubernetes' gRPC probes) use the plain-text health-only port.
        with grpc.insecure_channel(f"127.0.0.1:{probe_port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as err:
                inference_pb2_grpc.InferenceServiceStub(channel).Health(ipb.HealthRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # nothing but health there
        compositing = ServerThread.compositing(
            make_compositing_config(
                models_dir,
                f"localhost:{inference.running.port}",
                **{
                    "inference_server.plaintext": False,
                    "inference_server.tls.ca_file": str(pki.ca),
                    "inference_server.tls.cert_file": str(pki.client_cert),
                    "inference_server.tls.key_file": str(pki.client_key),
                    "warmup": False,
                    **tls_overrides(pki, mutual=False),
                },
            )
        )
        target = f"localhost:{compositing.running.port}"
        with LipsyncClient(target, timeout=30, tls=ClientTls(ca_file=pki.ca)) as client:
            response = client.stub.InferBatchComposite(composite_request(2), timeout=30)
            assert response.success and len(response.composited_frames) == 2
            assert client.health().inference_server_healthy

        # A plain-text client cannot talk to a TLS port.
        with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as err:
            compositing_pb2_grpc.CompositingServiceStub(channel).Health(pb.HealthRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        # Inference wants a client certificate signed by its CA: TLS without one is refused.
        creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        with (
            grpc.secure_channel(f"localhost:{inference.running.port}", creds) as channel,
            pytest.raises(grpc.RpcError) as err,
        ):
            inference_pb2_grpc.InferenceServiceStub(channel).Health(ipb.HealthRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # ... and a certificate from another CA is not trusted by the client.
        other = make_pki(tmp_path / "other")
        with LipsyncClient(target, timeout=5, tls=ClientTls(ca_file=other.ca)) as client, pytest.raises(LipsyncError):
            client.health()
    finally:
        if compositing is not None:
            compositing.stop()
        inference.stop()


def test_certificate_rotation_takes_effect_without_restart(models_dir: Path, tmp_path: Path) -> None:
    first = make_pki(tmp_path / "first")
    server = ServerThread(make_config(models_dir, **tls_overrides(first, mutual=False)))
    try:
        address = f"localhost:{server.running.port}"

        def health_with(ca: Path) -> bool:
            creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
            with grpc.secure_channel(address, creds) as channel:
                try:
                    return (
                        inference_pb2_grpc.InferenceServiceStub(channel).Health(ipb.HealthRequest(), timeout=5).healthy
                    )
                except grpc.RpcError:
                    return False

        assert health_with(first.ca)
        second = make_pki(tmp_path / "second")
        first.server_cert.write_bytes(second.server_cert.read_bytes())  # cert-manager renews the files in place
        first.server_key.write_bytes(second.server_key.read_bytes())
        assert wait_until(lambda: health_with(second.ca), timeout=30, interval=0.2), (
            "the renewed certificate was not picked up"
        )
        assert not health_with(first.ca)
    finally:
        server.stop()


@pytest.fixture()
def guarded(models_dir: Path, tmp_path: Path):
    """A compositing replica with tokens: an admin, and alice (5 requests/s, one session at a time).

    A new replica for each test, so alice's rate bucket starts full."""
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        yaml.safe_dump(
            {
                "tokens": [
                    {"name": "ops", "token": ADMIN, "admin": True},
                    {
                        "name": "alice",
                        "token": ALICE,
                        "requests_per_second": ALICE_RPS,
                        "burst": ALICE_BURST,
                        "max_sessions": 1,
                    },
                ]
            }
        )
    )
    inference = ServerThread(make_config(models_dir))
    compositing = ServerThread.compositing(
        make_compositing_config(
            models_dir,
            inference.address,
            **{
                "auth.enabled": True,
                "auth.tokens_file": str(tokens),
                "warmup": False,
                "metrics.enabled": True,
                "metrics.port": 0,
            },
        )
    )
    yield compositing
    compositing.stop()
    inference.stop()


def code_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_tokens_admin_and_limits(guarded: ServerThread) -> None:
    with grpc.insecure_channel(guarded.address) as channel:
        stub = compositing_pb2_grpc.CompositingServiceStub(channel)

        def as_(token: str | None):
            return [("authorization", f"Bearer {token}")] if token else []

        assert code_of(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
        assert (
            code_of(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=5, metadata=as_("alice-token-abcdefghiX")))
            == grpc.StatusCode.UNAUTHENTICATED
        )
        assert (
            code_of(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=5, metadata=[("authorization", ALICE)]))
            == grpc.StatusCode.UNAUTHENTICATED  # not a Bearer header
        )
        # Probes carry no token: the standard health service stays open.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        models = stub.ListModels(pb.ListModelsRequest(), timeout=5, metadata=as_(ALICE))
        assert "demo" in [m.model_id for m in models.models]
        with pytest.raises(grpc.RpcError) as err:
            stub.LoadModel(pb.LoadModelRequest(model_id="demo"), timeout=30, metadata=as_(ALICE))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "admin" in err.value.details()
        assert stub.LoadModel(pb.LoadModelRequest(model_id="demo"), timeout=60, metadata=as_(ADMIN)).success

        # alice may send 5 requests at once, then about 5 a second: a burst is cut off with a retry hint.
        # The wait is the behaviour under test: her bucket (one request spent above) refills at its configured rate,
        # from empty to full in burst / rate seconds; a quarter more for margin.
        time.sleep(ALICE_BURST / ALICE_RPS * 1.25)
        outcomes, hints = [], []
        started = time.monotonic()
        while outcomes.count("RESOURCE_EXHAUSTED") < 4 and len(outcomes) < 60:  # back to back until cut off
            try:
                stub.Health(pb.HealthRequest(), timeout=5, metadata=as_(ALICE))
                outcomes.append("ok")
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)
                hints += [int(v) for k, v in exc.trailing_metadata() or () if k == "retry-after-ms"]
        elapsed = time.monotonic() - started
        assert outcomes[:ALICE_BURST] == ["ok"] * ALICE_BURST, outcomes  # a full bucket: the first 5 go at once
        # ... and after them only what the bucket refilled while the burst lasted, however long that was here.
        assert outcomes.count("ok") <= ALICE_BURST + ALICE_RPS * elapsed + 1, (outcomes, elapsed)
        assert outcomes.count("RESOURCE_EXHAUSTED") >= 4 and set(outcomes) == {"ok", "RESOURCE_EXHAUSTED"}, outcomes
        assert hints and all(0 < h <= 1000 for h in hints)
        # The admin's own bucket is untouched.
        assert stub.Health(pb.HealthRequest(), timeout=5, metadata=as_(ADMIN)).healthy
    # Each refusal is counted under its reason.
    with urllib.request.urlopen(f"http://127.0.0.1:{guarded.running.metrics_port}/metrics", timeout=10) as page:
        text = page.read().decode()
    rejected = {
        line.split('reason="')[1].split('"')[0]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("lipsync_rejected_requests_total{")
    }
    assert rejected["unauthenticated"] >= 3 and rejected["permission_denied"] >= 1
    assert rejected["rate_limited"] == outcomes.count("RESOURCE_EXHAUSTED"), rejected


def test_sessions_per_token(guarded: ServerThread) -> None:
    with LipsyncClient(guarded.address, timeout=30, token=ALICE) as client:
        with client.session("demo") as session:  # alice's rate bucket is full: the replica is new
            with pytest.raises(LipsyncError) as err:
                client.session("demo")
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "alice" in str(err.value)
            session.end_of_input()
            session.close()
            list(session.frames())
        limits = guarded.running.policy.limits
        assert wait_until(lambda: limits.sessions("alice") == 0), "the first session's slot was not given back"
        with client.session("demo") as again:  # the slot is free again once the first ended
            again.close()
            list(again.frames())
    with LipsyncClient(guarded.address, timeout=30) as anonymous, pytest.raises(LipsyncError) as err:
        anonymous.models()
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_compositing_passes_its_token_to_an_inference_service_with_auth(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_INFERENCE_TOKENS", f"compositing:{ADMIN}:admin")
    monkeypatch.setenv("TEST_INFERENCE_TOKEN", ADMIN)
    inference = ServerThread(
        make_config(models_dir, **{"auth.enabled": True, "auth.tokens_env": "TEST_INFERENCE_TOKENS"})
    )
    compositing = ServerThread.compositing(
        make_compositing_config(
            models_dir, inference.address, **{"inference_server.token_env": "TEST_INFERENCE_TOKEN", "warmup": False}
        )
    )
    try:
        with grpc.insecure_channel(inference.address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                inference_pb2_grpc.InferenceServiceStub(channel).ListModels(ipb.ListModelsRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with LipsyncClient(compositing.address, timeout=60) as client:
            response = client.stub.InferBatchComposite(composite_request(), timeout=30)
            assert response.success
            assert client.stub.LoadModel(pb.LoadModelRequest(model_id="demo", force_reload=True), timeout=60).success
    finally:
        compositing.stop()
        inference.stop()


def test_client_cli_sends_the_token(guarded: ServerThread, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    from lipsync_client.cli import main

    # alice's rate bucket is full: the replica is new (and these two calls are well within its burst)
    assert main(["health", "--server", guarded.address, "--token", ALICE]) == 0
    monkeypatch.setenv("LIPSYNC_TOKEN", ALICE)
    assert main(["models", "--server", guarded.address]) == 0
    assert "demo" in capsys.readouterr().out
    monkeypatch.delenv("LIPSYNC_TOKEN")
    assert main(["models", "--server", guarded.address]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["health", "--server", guarded.address, "--cert-file", "c.pem"]) == 1
    assert "--cert-file and --key-file" in capsys.readouterr().err
