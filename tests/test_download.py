"""CIFAR-10 on first use, against an HTTP server on 127.0.0.1 serving a tarball the test builds:
a whole download, a cut one resumed by a Range request (within a run and across runs), a
server that ignores Range, a corrupted one, no network, a tampered archive, and `main` with no
data flags."""

import hashlib
import http.server
import io
import os
import re
import tarfile
import threading
import time

import numpy as np
import pytest
from helpers import SMOKE_FLAGS, free_port, run_module, write_cifar_folder

from dcff_jax import input_pipeline as ip
from dcff_jax.data import download
from dcff_jax.errors import DataError, MissingFileError


def tarball(root, extra: dict[str, bytes] | None = None, drop: str = "") -> bytes:
    """The official archive's layout (cifar-10-batches-py/ + 7 members) around tiny random data."""
    folder = os.path.join(write_cifar_folder(str(root), train=20, test=10), "cifar-10-batches-py")
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        f.write(b"meta")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in sorted(os.listdir(folder)):
            if name != drop:
                tar.add(os.path.join(folder, name), f"cifar-10-batches-py/{name}")
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class Server:
    """Serves `payload` at /cifar.tar.gz with Range support. mode: "ok"; "cut_once" (the first
    response announces every byte and sends half); "corrupt" (one byte flipped); "no_range"
    (Range ignored); "slow" (sends in pieces, for overlapping clients). Records each Range."""

    def __init__(self, payload: bytes, mode: str = "ok"):
        self.payload, self.mode, self.ranges = payload, mode, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path != "/cifar.tar.gz":
                    self.send_error(404)
                    return
                requested = self.headers.get("Range")
                server.ranges.append(requested)
                body = server.payload
                if server.mode == "corrupt":
                    body = body[:100] + bytes([body[100] ^ 0xFF]) + body[101:]
                start = 0
                if requested and server.mode != "no_range":
                    start = int(requested.removeprefix("bytes=").rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if server.mode == "cut_once" and len(server.ranges) == 1:
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                if server.mode == "slow":
                    for i in range(start, len(body), 4096):
                        self.wfile.write(body[i : i + 4096])
                        time.sleep(0.01)
                    return
                self.wfile.write(body[start:])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/cifar.tar.gz"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(download, "_BACKOFF_S", 0.0)


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    data = tarball(tmp_path_factory.mktemp("src"))
    return data, hashlib.md5(data).hexdigest()


@pytest.fixture
def serve(payload):
    servers = []

    def start(mode="ok", data=None):
        servers.append(Server(payload[0] if data is None else data, mode))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def assert_matches_source(folder: str, tmp_path):
    """The extracted folder reads as the data the archive was built from."""
    source = write_cifar_folder(str(tmp_path / "again"), train=20, test=10)
    for split in ("train", "test"):
        for got, want in zip(
            ip.read_cifar_folder(folder, split), ip.read_cifar_folder(source, split), strict=True
        ):
            np.testing.assert_array_equal(got, want)


def test_first_use_downloads_verifies_and_extracts_then_uses_the_cache(payload, serve, tmp_path):
    server = serve()
    cache = str(tmp_path / "cache")
    folder = download.ensure_cifar10(cache, server.url, payload[1])
    assert folder == os.path.join(cache, "cifar-10-batches-py")
    assert sorted(os.listdir(folder)) == sorted(download.MEMBERS)
    assert_matches_source(folder, tmp_path)
    assert not os.path.exists(os.path.join(cache, download.ARCHIVE + ".part"))
    assert download.ensure_cifar10(cache, server.url, payload[1]) == folder
    assert server.ranges == [None]  # the second call used the cache
    # The archive alone (the folder deleted, or copied in by hand) is extracted, not fetched.
    os.rename(folder, folder + ".old")
    assert download.ensure_cifar10(cache, server.url, payload[1], download=False) == folder
    assert server.ranges == [None]


def test_a_cut_download_is_resumed_with_a_range_request(payload, serve, tmp_path):
    server = serve("cut_once")
    folder = download.ensure_cifar10(str(tmp_path), server.url, payload[1])
    half = len(payload[0]) // 2
    assert server.ranges == [None, f"bytes={half}-"]
    assert_matches_source(folder, tmp_path)


def test_a_part_left_by_an_earlier_run_is_resumed_not_refetched(payload, serve, tmp_path):
    server = serve()
    with open(tmp_path / (download.ARCHIVE + ".part"), "wb") as f:
        f.write(payload[0][:1000])
    download.ensure_cifar10(str(tmp_path), server.url, payload[1])
    assert server.ranges == ["bytes=1000-"]
    assert hashlib.md5((tmp_path / download.ARCHIVE).read_bytes()).hexdigest() == payload[1]


def test_a_server_that_ignores_range_gets_the_file_rewritten_from_the_start(
    payload, serve, tmp_path
):
    server = serve("no_range")
    with open(tmp_path / (download.ARCHIVE + ".part"), "wb") as f:
        f.write(payload[0][:1000])
    download.ensure_cifar10(str(tmp_path), server.url, payload[1])
    assert server.ranges == ["bytes=1000-"]
    assert (tmp_path / download.ARCHIVE).read_bytes() == payload[0]


def test_a_corrupted_download_is_fetched_again_once_then_refused(payload, serve, tmp_path):
    server = serve("corrupt")
    with pytest.raises(DataError, match=f"not {payload[1]}, twice"):
        download.ensure_cifar10(str(tmp_path), server.url, payload[1])
    assert server.ranges == [None, None]
    # Nothing half-made is left to be trusted later.
    assert sorted(os.listdir(tmp_path)) == [".cifar-10.lock"]


def test_a_local_archive_with_another_md5_is_refused_and_kept(payload, tmp_path):
    archive = tmp_path / download.ARCHIVE
    archive.write_bytes(payload[0][:-1] + b"x")
    with pytest.raises(DataError, match="not the official CIFAR-10 archive"):
        download.ensure_cifar10(str(tmp_path), "http://127.0.0.1:9/x", payload[1])
    assert archive.exists()


def test_no_network_says_where_to_put_the_files_and_keeps_what_arrived(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/cifar.tar.gz"  # nobody listens there
    with pytest.raises(MissingFileError, match=f"put the official {download.ARCHIVE}.* in "):
        download.ensure_cifar10(str(tmp_path), url, "0" * 32)
    part = tmp_path / (download.ARCHIVE + ".part")
    part.write_bytes(b"12345")
    with pytest.raises(MissingFileError, match="the 5 bytes received are kept"):
        download.ensure_cifar10(str(tmp_path), url, "0" * 32)
    with pytest.raises(MissingFileError, match="--config.download=False"):
        download.ensure_cifar10(str(tmp_path / "off"), url, "0" * 32, download=False)


def test_only_the_known_members_are_extracted_by_name(tmp_path):
    evil = tarball(tmp_path / "a", extra={"../escaped": b"x", "/tmp/absolute": b"x"})
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(evil)
    folder = download.extract_cifar10(str(archive), str(tmp_path / "out"))
    assert sorted(os.listdir(folder)) == sorted(download.MEMBERS)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "out" / "escaped").exists()
    lacking = tmp_path / "lacking.tar.gz"
    lacking.write_bytes(tarball(tmp_path / "b", drop="test_batch"))
    with pytest.raises(DataError, match="lacks cifar-10-batches-py/test_batch"):
        download.extract_cifar10(str(lacking), str(tmp_path / "out2"))
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"not a tarball")
    with pytest.raises(DataError, match="not a readable .tar.gz"):
        download.extract_cifar10(str(garbage), str(tmp_path / "out3"))


def test_processes_sharing_a_cache_download_once(payload, serve, tmp_path):
    server = serve("slow")
    results, errors = [], []

    def fetch():
        try:
            results.append(download.ensure_cifar10(str(tmp_path), server.url, payload[1]))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and len(set(results)) == 1 and len(results) == 3
    assert server.ranges == [None]


def test_cifar10_reads_a_folder_at_data_dir_without_tfds_or_network(tmp_path):
    folder = write_cifar_folder(str(tmp_path), train=20, test=10)
    config = ip_config(folder, download=False, cifar10_url="http://127.0.0.1:9/none")
    data = ip.load_data(config)
    assert data.train.num_examples == 20 and data.test.num_examples == 10


def ip_config(data_dir, **overrides):
    from helpers import tiny_config

    return tiny_config(data_dir, dataset="cifar10", **overrides)


@pytest.mark.slow
def test_main_with_no_data_flags_downloads_into_the_cache_and_trains(payload, serve, tmp_path):
    """The README's first command for a user with internet: no data flags. The test points the
    URL (and md5) at the local server and the caches at tmp_path."""
    server = serve()
    env = {
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "TFDS_DATA_DIR": str(tmp_path / "no_tfds"),
    }
    proc = run_module(
        "dcff_jax.main",
        "--config=configs/resnet56_cifar.py",
        f"--workdir={tmp_path / 'wd'}",
        f"--config.cifar10_url={server.url}",
        f"--config.cifar10_md5={payload[1]}",
        "--config.batch_size=10",
        "--config.num_epochs=1",
        *SMOKE_FLAGS,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "cache" / "dcff_jax" / "cifar-10-batches-py"
    assert f"CIFAR-10 from {folder}" in proc.stderr
    assert "epoch 1/1: test top-1" in proc.stderr
    # The run's end says where the export went, also when, as here, the one epoch scores 0%.
    assert re.search(
        rf"exported the compact model of epoch 1 \(test top-1 [\d.]+%\) to "
        rf"{re.escape(str(tmp_path / 'wd' / 'compact' / 'v1'))}$",
        proc.stderr,
        re.M,
    )
    assert server.ranges == [None]
