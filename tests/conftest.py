import fcntl
import json
import os
import subprocess
import sys

import pytest

from helpers.runtime.startup import start

NATIVE_CHOICE = start()  # before anything imports the low-bit library: chooses its native library for this CPU
from helpers.measure.provenance import describe, instruction_sets, machine  # noqa: E402
from helpers.runtime import cpu, fused_decode, library  # noqa: E402
from helpers.lessons.quality import logits_for  # noqa: E402
from helpers.runtime.formats import CHOICES  # noqa: E402
from helpers.runtime.loading import ensure_cache, load_hf_model, load_low_bit_model, load_tokenizer  # noqa: E402
from helpers.runtime.models import resolve_model  # noqa: E402
from helpers.runtime.paths import DATA_DIR, MODELS_DIR  # noqa: E402
from helpers.runtime.settings import read as read_settings  # noqa: E402
from helpers.measure.checkpoints import ensure_checkpoint  # noqa: E402

SAMPLE_TEXTS = json.loads((DATA_DIR / "sample_texts.json").read_text(encoding="utf-8"))


def pytest_report_header(config):
    """What this run checks on this CPU, and what it cannot: the kernel builds and decoding paths."""
    info, seen_as = cpu.cpu_info(), read_settings().cpuinfo
    runnable = fused_decode.runnable_kernels(info)
    fused = [f"{name} (on the avx512 build's instructions)" if name == "avxvnni" and not info.has("avx_vnni") else name
             for name in runnable]
    lacking = [f"{name} (needs {', '.join(flag for flag in needed if not info.has(flag))})"
               for name, (needed, _) in fused_decode.KERNELS.items() if name not in runnable]
    native_lacking = [f"{build} (needs {', '.join(sorted(flag for flag in needed if not info.has(flag)))})"
                      for build, needed in cpu.NATIVE_BUILDS if not info.has(*needed)]
    seen = f"{info.model} ({', '.join(instruction_sets(info))}), as RWKV_CPUINFO={seen_as} describes it; "
    real = {key: value for key, value in machine().items() if key != "run_as"}
    return [f"CPU: {seen if seen_as else ''}this machine: {describe(real)}",
            f"fused step builds checked: {', '.join(fused) or 'none'}; not on this CPU: {', '.join(lacking) or 'none'}",
            f"{library.name()} {library.version()}'s kernels: libllama_{NATIVE_CHOICE.build} ({NATIVE_CHOICE.reason}); "
            "builds this CPU cannot run: "
            f"{', '.join(native_lacking) or 'none'}",
            f"decoding path: {fused_decode.decoding_path()}"]


def pytest_addoption(parser):
    parser.addoption("--screenshots", help="folder for the browser tests' screenshots (default: a temporary folder; "
                     "docs updates the README's)")


# What tests and notebooks in several processes read from data/models (make test runs two): checkpoints (notebook
# 04's shape among them), and low-bit caches of them in these formats.
SHARED_FILES = [("tiny", "safetensors", ["sym_int4"]), ("tiny", "hub", ["sym_int4"]), ("169m", "hub", ["sym_int4"]),
                (None, None, CHOICES)]


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist starts its processes, in the one that starts them
def pytest_sessionstart(session):
    """SHARED_FILES built where missing before any test, by the first process here while others wait, so that
    no two processes write one at once and none reads one half written."""
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    with open(MODELS_DIR / ".tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for shape, layout, formats in SHARED_FILES:
            source = resolve_model(str(ensure_checkpoint(shape, layout=layout)) if shape else None)  # None: the trained model
            for low_bit in formats:
                ensure_cache(source, low_bit, report=lambda line: None)


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


@pytest.fixture(scope="session")
def input_ids(tokenizer):
    """The sample texts' token ids, [1, tokens]."""
    return tokenizer("\n".join(SAMPLE_TEXTS.values()), return_tensors="pt").input_ids


@pytest.fixture(scope="session")
def sym_int4_logits(tiny_source, input_ids):
    return logits_for(load_low_bit_model(tiny_source, "sym_int4"), input_ids)


@pytest.fixture
def cache_here(tmp_path, monkeypatch):
    """The low-bit cache in a folder of the test's own; returns the lines the loads report."""
    monkeypatch.setattr("helpers.runtime.low_bit_cache.CACHE_DIR", tmp_path / "cache")
    return []


def table_rows(markdown):
    """The stripped cells of every row of the Markdown tables in a text, separator rows left out."""
    return [[cell.strip() for cell in line.strip()[1:-1].split("|")] for line in markdown.splitlines()
            if line.startswith("|") and not set(line.strip()) <= set("|-: ")]


def run_cli(*args, env=None, timeout=300):
    """Run `python -m ARGS` in a fresh interpreter; returns the CompletedProcess."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=full_env, timeout=timeout)


def run_python(code, env=None):
    """Run code in a fresh interpreter (so the native library is chosen anew); returns its stdout.
    env: variables to set, or to unset where None."""
    full_env = {name: value for name, value in {**os.environ, **(env or {})}.items() if value is not None}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, check=True).stdout
