"""The README and docs/ as a user follows them: every shell and Python block either runs here,
as written, or says in its first line why not (visible to the reader), so none goes stale
unnoticed.

A block runs when the line before its fence is a marker:
  <!-- docs-test: run -->                       as written;
  <!-- docs-test: run, with FLAGS -->           FLAGS added to each `python -m dcff_jax.main`
                                               (a few steps instead of 300 epochs);
  <!-- docs-test: run without the install, with FLAGS -->
                                               also without its leading `pip install ... &&`
                                               (CI has installed the package already).
Otherwise its first line is `# Not run by the docs test: <why>`.

The pages run in the order a reader meets them (the README, then docs/ in DOC_ORDER), in one
working directory, so later pages use what earlier ones made (`workdir/quick`). That directory
holds links to configs/, examples/ and experiments/, and the CIFAR-10 cache the commands find
without data flags (a small stand-in with the official layout, in $XDG_CACHE_HOME); nothing
reaches the network.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import subprocess
import sys

import pytest
from helpers import ROOT, run_python, write_cifar_folder

# The order a reader meets the pages in (the README's links).
DOC_ORDER = (
    "README.md",
    "docs/training.md",
    "docs/own_model.md",
    "docs/deploying.md",
    "docs/fidelity.md",
    "docs/performance.md",
    "docs/layout.md",
)
COMMAND_LANGUAGES = ("bash", "sh", "python")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.M | re.S)
MARKER = re.compile(
    r"<!-- docs-test: run(?P<no_install> without the install)?(?:,? with (?P<flags>.*?))? -->"
)
NOT_RUN = re.compile(r"^# Not run by the docs test: \S.{10,}")
README_MAX_LINES = 150


@dataclasses.dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    marker: re.Match | None

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(page: str) -> list[Block]:
    """The fenced blocks of `page` (a path relative to the repository), in order."""
    with open(os.path.join(ROOT, page)) as f:
        text = f.read()
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(page, line, match.group(1), match.group(2), MARKER.fullmatch(before)))
    return found


def all_pages() -> list[str]:
    pages = ["README.md"] + sorted(
        f"docs/{name}" for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md")
    )
    return pages


def test_every_page_is_in_the_reading_order():
    assert sorted(all_pages()) == sorted(DOC_ORDER)


@pytest.mark.parametrize("page", DOC_ORDER)
def test_every_command_block_runs_or_says_why_not(page):
    for block in blocks(page):
        assert block.language, f"{block}: a fenced block names its language (text for output)"
        if block.language not in COMMAND_LANGUAGES:
            assert block.marker is None, f"{block}: only shell and Python blocks run"
            continue
        first = block.code.split("\n", 1)[0]
        assert (block.marker is not None) != bool(NOT_RUN.match(first)), (
            f"{block}: mark it <!-- docs-test: run ... --> or begin it with "
            "'# Not run by the docs test: <why>' (not both)"
        )


def test_the_readme_is_a_front_page_whose_links_resolve():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert len(readme.splitlines()) <= README_MAX_LINES
    for page in DOC_ORDER:
        links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", open(os.path.join(ROOT, page)).read())
        for link in links:
            if "://" in link:
                continue
            target = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), link))
            assert os.path.exists(target), f"{page} links to {link}, which does not exist"


def test_the_readme_picture_is_what_the_package_computes():
    """The README's picture of one layer's fusion holds experiments/fusion_picture.py's lines."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    try:
        from fusion_picture import picture_lines
    finally:
        sys.path.remove(os.path.join(ROOT, "experiments"))
    (picture,) = [b.code for b in blocks("README.md") if b.language == "text"][:1]
    for line in picture_lines():
        assert line in picture.splitlines(), f"the README's picture lacks {line!r}"


def as_tested(block: Block) -> str:
    """The block's code as the test runs it: flags added to each main command, the install
    dropped where the marker says so."""
    code = block.code
    if block.marker.group("no_install"):
        code, n = re.subn(r"^pip install [^&\n]*&& ", "", code, flags=re.M)
        assert n, f"{block}: the marker says 'without the install' but no install leads a line"
    flags = block.marker.group("flags")
    if flags:
        lines = code.split("\n")
        mains = [i for i, line in enumerate(lines) if "python -m dcff_jax.main " in line]
        assert mains, f"{block}: flags given but no `python -m dcff_jax.main` to add them to"
        for i in mains:
            lines[i] = f"{lines[i]} {flags}"
        code = "\n".join(lines)
    return code


@pytest.fixture(scope="module")
def reader_dir(tmp_path_factory):
    """The working directory of a reader with a clone: links to the repository's configs,
    examples and experiments, and a CIFAR-10 cache the commands find by themselves."""
    home = tmp_path_factory.mktemp("reader")
    for name in ("configs", "examples", "experiments"):
        os.symlink(os.path.join(ROOT, name), home / name)
    cache = home / "cache"
    # 4 batches of 32 (the flags the markers add): the commands run whole epochs in seconds.
    write_cifar_folder(str(cache / "dcff_jax"), train=128, test=32)
    # The official folder's last member, which a download leaves and the cache looks for.
    with open(cache / "dcff_jax" / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        label_names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog"]
        pickle.dump({b"label_names": label_names + [b"horse", b"ship", b"truck"]}, f)
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XDG_CACHE_HOME": str(cache),
        "TFDS_DATA_DIR": str(home / "no_tfds"),
        "PYTHONPATH": ROOT,
    }
    return home, env


def run_block(block: Block, cwd, env) -> None:
    code = as_tested(block)
    if block.language == "python":  # as pasted into a fresh `python`
        proc = run_python([sys.executable, "-c", code], cwd=str(cwd), env=env)
    else:
        argv = ["bash", "-euo", "pipefail", "-c", code]
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{block} failed:\n{code}\n{proc.stderr[-4000:]}"


@pytest.mark.slow
def test_the_pages_run_as_a_reader_follows_them(reader_dir):
    """Every marked block of every page, in reading order, in one working directory."""
    cwd, env = reader_dir
    ran = []
    for page in DOC_ORDER:
        for block in blocks(page):
            if block.language in COMMAND_LANGUAGES and block.marker is not None:
                run_block(block, cwd, env)
                ran.append(str(block))
    assert ran, "no block is marked to run"
    # What the README's commands promise a reader: an export to evaluate and load.
    assert (cwd / "workdir" / "quick" / "compact" / "LATEST").read_text().strip() == "v1"
    # docs/training.md starts the README's finished run again: it finds it finished and exports
    # nothing (no v2).
    assert sorted(os.listdir(cwd / "workdir" / "quick" / "compact")) == ["LATEST", "v1"]
