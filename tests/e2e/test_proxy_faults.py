"""A replica that dies with a call in flight, behind the real nginx: the batch still succeeds for lipsync-client.

Two ways to die, each put first in nginx's upstream list in front of a real compositing server:

- after nginx sent it the whole request (a socket that reads it and resets): nginx cannot resend a streamed body,
  answers 502, and its config turns that into a gRPC UNAVAILABLE the client's retry policy retries;
- after its answer began (a gRPC server that sends its headers, then SIGKILLs itself): nginx has passed the headers
  on and resets the stream; no gRPC policy retries that, ``LipsyncClient`` asks again.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from support import ServerThread, make_compositing_config, make_config, wait_until

from lipsync_client.api import LipsyncClient, LipsyncError
from lipsync_client.retry import cut_in_transit, retrying
from lipsync_cluster import nginx
from service_common.processes import free_port
from shared_proto import compositing_pb2 as pb
from shared_proto import compositing_pb2_grpc

pytestmark = pytest.mark.needs_tools  # nginx in front of the replicas

# Larger than nginx's body preread (64 KiB, so nginx cannot resend it itself) and than gRPC's default retry buffer
# (256 KiB, beyond which gRPC does not retry at all unless told otherwise).
FRAMES = 10
FEATURES = np.full((FRAMES, 32, 16, 16), 0.6, np.float32).tobytes()

DIES_AFTER_HEADERS = textwrap.dedent(
    """
    import os, signal, time
    from concurrent import futures
    import grpc
    from shared_proto import compositing_pb2_grpc

    class Dying(compositing_pb2_grpc.CompositingServiceServicer):
        def InferBatchComposite(self, request, context):
            context.send_initial_metadata(())
            time.sleep(0.3)  # the headers reach nginx, which passes them on
            os.kill(os.getpid(), signal.SIGKILL)

    server = grpc.server(futures.ThreadPoolExecutor(2))
    compositing_pb2_grpc.add_CompositingServiceServicer_to_server(Dying(), server)
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    server.start()
    server.wait_for_termination()
    """
)


def request() -> pb.CompositeBatchRequest:
    return pb.CompositeBatchRequest(model_id="demo", audio_features=FEATURES, batch_size=FRAMES, start_frame_idx=3)


@pytest.fixture(scope="module")
def compositing(models_dir: Path) -> Iterator[ServerThread]:
    assert nginx.find_nginx(), nginx.install_hint()  # make test installs nginx: a failure, never a skip
    inference = ServerThread(make_config(models_dir))
    server = ServerThread.compositing(make_compositing_config(models_dir, inference.address, warmup=False))
    yield server
    server.stop()
    inference.stop()


@contextmanager
def proxy(tmp_path: Path, upstreams: list[str]) -> Iterator[str]:
    """The cluster's nginx config in front of ``upstreams``, in that order (nginx's first pick is the first)."""
    prefix = tmp_path / f"nginx-{time.monotonic_ns()}"
    nginx.prepare_prefix(prefix)
    port = free_port()
    (prefix / "nginx.conf").write_text(nginx.render(prefix, "127.0.0.1", port, upstreams))
    process = subprocess.Popen(nginx.command(nginx.find_nginx(), prefix))
    try:
        wait_until(lambda: _accepts(port), timeout=30)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def dies_with_request() -> Iterator[tuple[str, list[int]]]:
    """A listener that reads what nginx sends until it stops (HTTP/2 flow control: this peer never opens its window
    past 64 KiB) and resets the connection; the byte counts it read."""
    listener = socket.create_server(("127.0.0.1", 0))
    read: list[int] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed
            got = 0
            conn.settimeout(0.5)
            try:
                while True:
                    chunk = conn.recv(1 << 16)
                    if not chunk:
                        break
                    got += len(chunk)
            except OSError:
                pass
            read.append(got)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, as a kill does
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}", read
    finally:
        listener.close()


@contextmanager
def dies_after_headers() -> Iterator[subprocess.Popen]:
    process = subprocess.Popen([sys.executable, "-c", DIES_AFTER_HEADERS], stdout=subprocess.PIPE, text=True)
    try:
        process.port = int(process.stdout.readline())  # type: ignore[attr-defined]
        yield process
    finally:
        process.kill()
        process.wait(10)


def test_a_replica_that_dies_with_the_request_is_retried_onto_another(
    compositing: ServerThread, tmp_path: Path
) -> None:
    with dies_with_request() as (dying, read), proxy(tmp_path, [dying, compositing.address]) as address:
        client = LipsyncClient(address, timeout=60)
        for _ in range(4):
            response = client.composite(request())
            assert list(response.frame_indices) == list(range(3, 3 + FRAMES))
            assert len(response.composited_frames) == FRAMES
        client.close()
    assert read and max(read) > 60_000, f"the dying replica did not get the request: {read}"


def test_an_answer_cut_in_transit_is_asked_again(compositing: ServerThread, tmp_path: Path) -> None:
    # The case exists: gRPC's policy alone gives the caller the reset.
    with dies_after_headers() as dying, proxy(tmp_path, [f"127.0.0.1:{dying.port}", compositing.address]) as address:
        with grpc.insecure_channel(address, options=retrying()) as channel:
            stub = compositing_pb2_grpc.CompositingServiceStub(channel)
            with pytest.raises(grpc.RpcError) as cut:
                stub.InferBatchComposite(request(), timeout=60)
        assert cut_in_transit(cut.value), f"{cut.value.code()}: {cut.value.details()}"
        assert dying.wait(10) < 0

    # LipsyncClient asks again and gets the frames.
    with dies_after_headers() as dying, proxy(tmp_path, [f"127.0.0.1:{dying.port}", compositing.address]) as address:
        with LipsyncClient(address, timeout=60) as client:
            response = client.composite(request())
        assert list(response.frame_indices) == list(range(3, 3 + FRAMES))
        assert dying.wait(10) < 0, "the dying replica was not the first one asked"


def test_no_replica_up_is_a_grpc_unavailable_the_client_can_retry(tmp_path: Path) -> None:
    # nginx's 502 comes as a gRPC status in a Trailers-Only answer (its config's @unavailable), not an HTML page.
    nowhere = [f"127.0.0.1:{free_port()}"]
    with proxy(tmp_path, nowhere) as address, LipsyncClient(address) as client, pytest.raises(LipsyncError) as refused:
        client.composite(request())
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert "no compositing replica answered the call" in str(refused.value)
