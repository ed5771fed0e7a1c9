"""Shards from servers started on this machine: HTTP (Python's http.server, read through curl) and S3 (moto's
server, read through s3fs). They are split, resumed and counted exactly as local shards are."""

from __future__ import annotations

import contextlib
import functools
import socket
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import S3_PORT

from helpers import keys_of, run_module, take
from opt_ds.data.decode import DecodeConfig
from opt_ds.data.shards import ShardSpecError, expand_shards
from opt_ds.data.stream import ReaderConfig, SourceConfig, make_loader

ALL_KEYS = [f"syn000_{i:08d}" for i in range(60)]  # the synthetic_shards fixture: 60 samples in 6 shards


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve_http(handler, directory) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def http_shards(synthetic_shards):
    server = serve_http(QuietHandler, synthetic_shards)
    yield f"http://127.0.0.1:{server.server_address[1]}/shard-{{000000..000005}}.tar"
    server.shutdown()


@pytest.fixture(scope="module")
def s3_shards(synthetic_shards):
    """The shards in a bucket of moto's S3 server, on the port conftest points the suite's S3 endpoint at."""
    import s3fs

    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        s3fs.S3FileSystem.clear_instance_cache()
        store = s3fs.S3FileSystem()
        deadline = time.monotonic() + 60
        while True:
            try:
                store.mkdir("shards")
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        store.put([str(p) for p in sorted(synthetic_shards.glob("*.tar"))], "shards/triplets/")
        yield "s3://shards/triplets/"
    finally:
        server.kill()
        server.wait()
        s3fs.S3FileSystem.clear_instance_cache()


@contextlib.contextmanager
def refused_port():
    """A port bound and never listened on: a connection to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def loader(spec: str, rank: int = 0, world_size: int = 1, **reader):
    cfg = ReaderConfig(**{"batch_size": 4, "num_workers": 0, "shuffle_buffer": 0, **reader})
    return make_loader([SourceConfig("remote", spec)], DecodeConfig(), cfg, rank=rank, world_size=world_size)


def test_an_s3_prefix_is_listed_like_a_directory_and_split_over_ranks_and_workers(s3_shards):
    import s3fs

    assert expand_shards(s3_shards) == [f"{s3_shards}shard-{i:06d}.tar" for i in range(6)]
    seen = [keys_of(loader(s3_shards, rank, 2, num_workers=2, max_epochs=1)) for rank in range(2)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == ALL_KEYS
    store = s3fs.S3FileSystem()
    store.mkdir("shards/empty/")
    store.pipe("shards/empty/README", b"no shards here")
    with pytest.raises(ShardSpecError, match="s3://shards/empty/ holds no .tar objects"):
        expand_shards("s3://shards/empty/")
    with pytest.raises(ShardSpecError, match="s3://no-such-bucket/ does not exist"):
        expand_shards("s3://no-such-bucket/")


@pytest.mark.parametrize("store", ["http", "s3"])
def test_a_resumed_remote_stream_continues_the_local_streams_exact_batch_order(store, request, synthetic_shards):
    """Training streams forever (two workers, shuffled, across epochs); a stream resumed from its state after 17
    batches goes on as the uninterrupted one, which is batch for batch the stream of the same shards on disk."""
    spec = request.getfixturevalue(f"{store}_shards")
    make = functools.partial(loader, num_workers=2, shuffle_buffer=8, seed=9)
    reference = take(make(str(synthetic_shards)), 40)
    assert take(make(spec), 40) == reference
    first = make(spec)
    head = take(first, 17)
    second = make(spec)
    second.load_state_dict(first.state_dict())
    assert head + take(second, 23) == reference


@contextlib.contextmanager
def s3_endpoint(monkeypatch, url: str):
    """The suite's S3 endpoint replaced by `url` for this process's readers (num_workers=0)."""
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", url)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        monkeypatch.undo()
        s3fs.S3FileSystem.clear_instance_cache()


def test_missing_s3_objects_are_counted_and_an_unreachable_store_is_an_error_naming_them(s3_shards, monkeypatch):
    stream = loader(f"{s3_shards}shard-{{000004..000007}}.tar", max_epochs=1)  # 6 and 7 are not there
    assert sorted(keys_of(stream)) == ALL_KEYS[40:]
    assert stream.skip_counts() == {"tar_error": 2}

    with refused_port() as port, s3_endpoint(monkeypatch, f"http://127.0.0.1:{port}"):
        with pytest.raises(ShardSpecError, match=r"cannot list s3://shards/triplets/: EndpointConnectionError"):
            expand_shards(s3_shards)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=r"2 of its shards could not be read \(first: s3://shards/"):
            next(iter(loader(f"{s3_shards}shard-{{000000..000001}}.tar")))
        assert time.monotonic() - started < 120


class CuttingProxy:
    """A TCP relay to the S3 server that drops the connection 20 KB into every response to a GET of `cut`."""

    def __init__(self, upstream: int, cut: str):
        self.upstream, self.cut = upstream, cut.encode()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            cutting = threading.Event()
            threading.Thread(target=self._requests, args=(client, server, cutting), daemon=True).start()
            threading.Thread(target=self._responses, args=(server, client, cutting), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket, cutting: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if data.startswith(b"GET ") and self.cut in data.split(b"\r\n", 1)[0]:
                    cutting.set()
                server.sendall(data)

    def _responses(self, server: socket.socket, client: socket.socket, cutting: threading.Event) -> None:
        sent = 0
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if cutting.is_set():
                    client.sendall(data[: max(0, 20_000 - sent)])
                    sent += len(data)
                    if sent >= 20_000:
                        break
                else:
                    client.sendall(data)
        for end in (client, server):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def close(self) -> None:
        self.listener.close()


def test_an_s3_server_that_drops_the_connection_mid_shard_costs_that_shard_only(s3_shards, monkeypatch):
    """Every response to a GET of shard 2 is cut 20 KB in (of ~370 KB): s3fs and botocore retry, then the shard
    is counted and skipped, and the other shards are read whole."""
    proxy = CuttingProxy(S3_PORT, "shard-000002.tar")
    try:
        with s3_endpoint(monkeypatch, f"http://127.0.0.1:{proxy.port}"):
            started = time.monotonic()
            stream = loader(f"{s3_shards}shard-{{000000..000005}}.tar", max_epochs=1)
            keys = keys_of(stream)
            assert time.monotonic() - started < 120
    finally:
        proxy.close()
    assert set(ALL_KEYS) - set(keys) <= set(ALL_KEYS[20:30]) and set(ALL_KEYS[:20] + ALL_KEYS[30:]) <= set(keys)
    assert stream.skip_counts()["tar_error"] == 1


@pytest.mark.slow  # waits out a stalled shard three times (curl's retries)
def test_http_shards_missing_or_stalled_are_counted_and_the_rest_read(tmp_path):
    """A 404 used to escape the reader from the pipe's close (curl's exit 22) and end the run; a server that stops
    sending mid-shard held the reader for ever. Each is now counted and skipped, and every sample of the good
    shards is read."""
    run_module("opt_ds.data.build_shards", "synthetic", "--num", "40", "--max-samples", "10", "--out", str(tmp_path))
    (tmp_path / "shard-000003.tar").rename(tmp_path / "stalls.tar")  # samples 30-39

    class Handler(QuietHandler):
        def do_GET(self):
            if self.path != "/shard-000003.tar":  # served from tmp_path; shard-000004.tar is not there
                return super().do_GET()
            data = (tmp_path / "stalls.tar").read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:5000])  # part of the shard, then nothing for longer than the test waits
            self.wfile.flush()
            time.sleep(120)

    server = serve_http(Handler, tmp_path)
    try:
        stream = loader(
            f"http://127.0.0.1:{server.server_address[1]}/shard-{{000000..000004}}.tar", max_epochs=1, shard_stall_s=2
        )
        started = time.monotonic()
        keys = keys_of(stream)
        assert time.monotonic() - started < 60  # the stalled shard given up after 2 s, and after each of 2 retries
        assert {k for k in keys if not k.startswith("syn000_0000003")} == set(ALL_KEYS[:30])
        assert stream.skip_counts()["tar_error"] == 2  # the stalled shard and the missing one, named in the log
    finally:
        server.shutdown()
