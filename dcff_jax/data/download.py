"""CIFAR-10 on first use: the official python tarball, fetched into a cache, checked, extracted.

The URL and md5 are torchvision's, so the files are the ones the published code trains on. A
download cut short is kept as `<archive>.part` and resumed with an HTTP Range request (within a
run, and by the next run); the archive is renamed into place only once its md5 matches. Only
the seven known members are extracted, by name, so a tampered archive cannot write elsewhere.
Processes on one host share the cache under a file lock: one downloads, the others wait.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request

from absl import logging

from dcff_jax.errors import DataError, MissingFileError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
MEMBERS = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")

_CHUNK = 1 << 20
_TIMEOUT_S = 60
_BACKOFF_S = 0.5  # before retry k: _BACKOFF_S * 2**k seconds, at most 8


class _Incomplete(Exception):
    """The server closed the connection before the whole file arrived (the part is kept)."""


def default_cache_dir() -> str:
    """Where downloaded data lives when no --config.data_dir is given: $XDG_CACHE_HOME/dcff_jax
    (~/.cache/dcff_jax)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "dcff_jax")


def ensure_cifar10(
    cache_dir: str, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5, download: bool = True
) -> str:
    """The path of a complete `cifar-10-batches-py` folder in cache_dir, made on first use.

    An extracted folder is used as it is; else the archive in cache_dir (checked against md5);
    else, when download is on, the archive is fetched from url first.

    Raises:
      MissingFileError: nothing local and download is off, or the download failed (no network);
        the message says where to put the files.
      DataError: the archive's md5 differs (a local one is left in place; a downloaded one is
        deleted), or it lacks a member.
    """
    folder = os.path.join(cache_dir, FOLDER)
    if _complete(folder):
        return folder
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise MissingFileError(
            f"cannot create the CIFAR-10 cache folder {cache_dir} ({e}); pass a writable "
            "--config.data_dir"
        ) from e
    with _locked(os.path.join(cache_dir, ".cifar-10.lock")):
        if _complete(folder):  # another process made it while this one waited
            return folder
        archive = os.path.join(cache_dir, ARCHIVE)
        if os.path.isfile(archive):
            _check_md5(archive, md5)
        elif not download:
            raise MissingFileError(
                f"CIFAR-10 is not in {cache_dir} and --config.download=False: put the official "
                f"{ARCHIVE} (or its extracted {FOLDER} folder) there, or pass "
                "--config.data_dir=DIR holding either"
            )
        else:
            fetch(url, archive, md5)
        extract_cifar10(archive, cache_dir)
    return folder


def fetch(url: str, dest: str, md5: str, attempts: int = 4) -> None:
    """Download url to dest: resume `dest.part` (Range request), verify md5, rename into place.

    A cut connection is resumed up to `attempts` times in all; a finished file whose md5 differs
    is deleted and fetched again once.
    """
    part = dest + ".part"
    failure = None
    restarted = False
    for attempt in range(attempts):
        if attempt:
            time.sleep(min(_BACKOFF_S * 2**attempt, 8.0))
        try:
            _download_to(url, part)
        except _Incomplete as e:
            failure = e
            continue
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            failure = e
            if isinstance(e, urllib.error.HTTPError) and e.code not in (408, 429, 500, 502, 503):
                break  # 404 and the like: retrying will not help
            continue
        actual = _md5(part)
        if actual == md5 or not md5:
            os.replace(part, dest)
            return
        os.remove(part)
        if restarted:
            raise DataError(
                f"the file downloaded from {url} has md5 {actual}, not {md5}, twice: the server "
                "sends something else (check --config.cifar10_url and --config.cifar10_md5, or "
                f"put the official {ARCHIVE} in {os.path.dirname(dest)} by hand)"
            )
        restarted = True
        logging.warning("%s: md5 mismatch after download; fetching it again", url)
    have = os.path.getsize(part) if os.path.exists(part) else 0
    kept = f"; the {have} bytes received are kept and the next run resumes" if have else ""
    raise MissingFileError(
        f"could not download CIFAR-10 from {url} ({type(failure).__name__}: {failure}){kept}. "
        f"Without internet, put the official {ARCHIVE} (or its extracted {FOLDER} folder) in "
        f"{os.path.dirname(dest)}, or pass --config.data_dir=DIR holding either"
    )


def _download_to(url: str, part: str) -> None:
    """Append the rest of url to `part` (a Range request from its size); raise _Incomplete when
    the connection closes early."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing past `have`: the part is whole (md5 decides)
            return
        raise
    with response:
        if have and response.status != 206:  # the server ignored the Range: start over
            have = 0
        length = response.headers.get("Content-Length")
        expected = have + int(length) if length is not None else None
        logging.info("downloading %s (%s bytes, from byte %d)", url, expected or "?", have)
        with open(part, "ab" if have else "wb") as out:
            while chunk := _read(response):
                out.write(chunk)
            size = out.tell()
    if expected is not None and size < expected:
        raise _Incomplete(f"connection closed after {size} of {expected} bytes")


def _read(response) -> bytes:
    try:
        return response.read(_CHUNK)
    except http.client.IncompleteRead as e:  # what was read is good: keep it
        if e.partial:
            return e.partial
        raise _Incomplete("connection closed mid-transfer") from e


def extract_cifar10(archive: str, cache_dir: str) -> str:
    """Write the archive's seven members to cache_dir/cifar-10-batches-py (via a temporary
    folder renamed into place). Member names are looked up, never taken from the archive."""
    folder = os.path.join(cache_dir, FOLDER)
    staging = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for name in MEMBERS:
                try:
                    member = tar.getmember(f"{FOLDER}/{name}")
                except KeyError:
                    raise DataError(
                        f"{archive} lacks {FOLDER}/{name}: not the CIFAR-10 archive"
                    ) from None
                source = tar.extractfile(member) if member.isfile() else None
                if source is None:
                    raise DataError(f"{archive}: {FOLDER}/{name} is not a regular file")
                with source, open(os.path.join(staging, name), "wb") as out:
                    shutil.copyfileobj(source, out)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{archive} is not a readable .tar.gz ({e}); delete it and rerun") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _complete(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, name)) for name in MEMBERS)


def _check_md5(path: str, md5: str) -> None:
    actual = _md5(path)
    if md5 and actual != md5:
        raise DataError(
            f"{path} has md5 {actual}, not {md5}: it is not the official CIFAR-10 archive "
            "(or it is damaged); delete it to download it again"
        )


def _md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(path: str):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
