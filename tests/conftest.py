import json
import os
import subprocess
import sys

import pytest

from helpers.runtime.startup import start

start()  # before anything imports bigdl.llm: chooses its native library for this CPU
from helpers.runtime.loading import load_hf_model, load_tokenizer  # noqa: E402
from helpers.runtime.models import resolve_model  # noqa: E402
from helpers.runtime.paths import DATA_DIR  # noqa: E402
from helpers.tools.checkpoint import ensure_checkpoint  # noqa: E402

SAMPLE_TEXTS = json.loads((DATA_DIR / "sample_texts.json").read_text(encoding="utf-8"))


def pytest_addoption(parser):
    parser.addoption("--screenshots", help="folder for the browser tests' screenshots (default: a temporary folder; "
                     "docs updates the README's)")


@pytest.fixture(scope="session")
def tiny_source():
    """The random-weight checkpoint: right for shapes, speed and exactness checks, wrong for text and quality."""
    return resolve_model(str(ensure_checkpoint("tiny")))


@pytest.fixture(scope="session")
def trained_source():
    """The model trained here on Shakespeare, everything's default."""
    return resolve_model(None)


@pytest.fixture(scope="session")
def hub_source():
    """The tiny checkpoint in the layout the hub ships: config.json with intermediate_size null, pytorch_model.bin."""
    return resolve_model(str(ensure_checkpoint("tiny", layout="hub")))


@pytest.fixture(scope="session")
def tokenizer(tiny_source):
    return load_tokenizer(tiny_source)


@pytest.fixture(scope="session")
def fp32_model(tiny_source):
    return load_hf_model(tiny_source)


def run_cli(*args, env=None, timeout=300):
    """Run `python -m ARGS` in a fresh interpreter; returns the CompletedProcess."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=full_env, timeout=timeout)


def run_python(code, env=None):
    """Run code in a fresh interpreter (so the native library is chosen anew); returns its stdout.
    env: variables to set, or to unset where None."""
    full_env = {name: value for name, value in {**os.environ, **(env or {})}.items() if value is not None}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, check=True).stdout
