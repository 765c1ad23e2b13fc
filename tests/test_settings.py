"""The settings module: every variable read there, typed, with a flag naming it; and the version check."""
import argparse
import logging
import re
import subprocess
import sys

import pytest

from helpers.runtime import settings
from helpers.runtime.paths import REPO_ROOT
from helpers.runtime.versions import PINNED, version_problems


def test_read_types_and_defaults():
    assert settings.read({}) == settings.Settings()
    read = settings.read({"RWKV_MODEL": " RWKV/rwkv-4-world-7b ", "RWKV_FUSED_DECODE": "0", "RWKV_LOW_BIT_CACHE": "1",
                          "OMP_NUM_THREADS": "4"})
    assert (read.model, read.fused_decode, read.low_bit_cache, read.omp_threads) == ("RWKV/rwkv-4-world-7b", False, True, 4)


def test_flags_name_their_variable_and_win_over_it():
    parser = argparse.ArgumentParser()
    settings.add_flags(parser, "model", "fused_decode", "fused_kernel")
    for name in ("model", "fused_decode", "fused_kernel"):
        assert settings.SETTINGS[name].variable in parser.format_help()
    environment = {"RWKV_MODEL": "from-env", "RWKV_FUSED_KERNEL": "avx2"}
    chosen = settings.from_flags(parser.parse_args(["--model", "from-flag", "--no-fused-decode"]), environment)
    assert (chosen.model, chosen.fused_decode, chosen.fused_kernel) == ("from-flag", False, "avx2")
    assert settings.variables(chosen) == {"RWKV_MODEL": "from-flag", "RWKV_FUSED_DECODE": "0", "RWKV_FUSED_KERNEL": "avx2"}


def test_the_readme_table_lists_every_variable():
    readme = (REPO_ROOT / "README.md").read_text()
    for setting in settings.SETTINGS.values():
        assert re.search(rf"^\| `{setting.variable}` \|", readme, re.M), setting.variable


def test_the_environment_is_read_in_one_place():
    found = subprocess.run(["grep", "-rln", "--include=*.py", "os.environ", "helpers"], capture_output=True, text=True,
                           cwd=REPO_ROOT).stdout.split()
    assert found == ["helpers/runtime/settings.py"]


def test_pins_are_the_requirements():
    requirements = (REPO_ROOT / "requirements.txt").read_text()
    for name, (version, _) in PINNED.items():
        assert re.search(rf"^{re.escape(name)}(\[[^\]]*\])?=={re.escape(version)}$", requirements, re.M), name


def test_a_different_version_is_named(monkeypatch):
    from importlib import metadata

    monkeypatch.setattr(metadata, "version", lambda name: "9.9.9")
    [line] = version_problems(["transformers"])
    assert "transformers 9.9.9" in line and "4.31.0" in line and "pip install transformers==4.31.0" in line
    assert version_problems([]) == []


@pytest.mark.parametrize("name", ["transformers", "bigdl-llm", "fschat"])
def test_the_installed_versions_are_the_pinned_ones(name):
    assert version_problems([name]) == []


def test_after_start_bigdl_llm_logs_no_info_lines():
    """bigdl-llm sets up INFO logging when imported (a timestamped line per conversion, in every notebook cell
    that loads a model); start() configures logging first, so that it does not."""
    script = ("import logging; from helpers.runtime.startup import start; start(); import bigdl.llm.transformers; "
              "print(logging.getLogger().getEffectiveLevel())")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.stdout.split()[-1] == str(logging.WARNING), result.stderr[-2000:]
