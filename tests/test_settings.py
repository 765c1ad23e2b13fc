"""The settings module: every variable read there, typed, with a flag naming it; and the version check."""
import argparse
import logging
import os
import re
import subprocess
import sys

import pytest

from helpers.runtime import library, settings
from helpers.runtime.errors import UserError
from helpers.runtime.paths import REPO_ROOT
from helpers.runtime.versions import REQUIREMENTS, TESTED, version_problems


def test_read_types_and_defaults():
    assert settings.read({}) == settings.Settings()
    read = settings.read({"RWKV_MODEL": " RWKV/rwkv-4-world-7b ", "RWKV_FUSED_DECODE": "0", "RWKV_LOW_BIT_CACHE": "1",
                          "OMP_NUM_THREADS": "4"})
    assert (read.model, read.fused_decode, read.low_bit_cache, read.omp_threads) == ("RWKV/rwkv-4-world-7b", False, True, 4)


SWITCHES = [name for name, value in settings.DEFAULTS.__dict__.items() if isinstance(value, bool)]


@pytest.mark.parametrize("name", SWITCHES)
def test_every_switch_reads_as_people_write_it(name):
    variable = settings.SETTINGS[name].variable
    for words, value in ((["0", "false", "no", "off", "OFF", " False "], False), (["1", "true", "yes", "on", "Yes"], True)):
        assert {getattr(settings.read({variable: word}), name) for word in words} == {value}
    for text in ("maybe", "", "2", "disabled"):
        with pytest.raises(settings.BadSetting) as refused:
            settings.read({variable: text})
        message = str(refused.value)
        assert variable in message and "1/true/yes/on/0/false/no/off" in message and "\n" not in message


@pytest.mark.library_independent
def test_a_tool_refuses_a_bad_switch_in_one_line():
    result = subprocess.run([sys.executable, "-m", "helpers.tools.generate", "--n-predict", "1"], capture_output=True,
                            text=True, cwd=REPO_ROOT, env={**os.environ, "RWKV_FUSED_DECODE": "maybe"})
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: RWKV_FUSED_DECODE='maybe' is not a switch; set it to one of 1/true/yes/on/0/false/no/off (any case), "
        "or unset it"]


def test_flags_name_their_variable_and_win_over_it():
    parser = argparse.ArgumentParser()
    settings.add_flags(parser, "model", "fused_decode", "fused_kernel")
    for name in ("model", "fused_decode", "fused_kernel"):
        assert settings.SETTINGS[name].variable in parser.format_help()
    environment = {"RWKV_MODEL": "from-env", "RWKV_FUSED_KERNEL": "avx2"}
    chosen = settings.from_flags(parser.parse_args(["--model", "from-flag", "--no-fused-decode"]), environment)
    assert (chosen.model, chosen.fused_decode, chosen.fused_kernel) == ("from-flag", False, "avx2")
    assert settings.variables(chosen) == {"RWKV_MODEL": "from-flag", "RWKV_FUSED_DECODE": "0", "RWKV_FUSED_KERNEL": "avx2"}


def test_the_settings_page_lists_every_variable():
    readme = (REPO_ROOT / "docs" / "setup.md").read_text()
    for setting in settings.SETTINGS.values():
        assert re.search(rf"^\| `{setting.variable}` \|", readme, re.M), setting.variable


def test_the_environment_is_read_in_one_place():
    found = subprocess.run(["grep", "-rln", "--include=*.py", "os.environ", "helpers"], capture_output=True, text=True,
                           cwd=REPO_ROOT).stdout.split()
    assert found == ["helpers/runtime/settings.py"]


@pytest.mark.parametrize("low_bit_library", TESTED)
def test_the_tested_versions_are_the_requirements(low_bit_library):
    requirements = (REPO_ROOT / REQUIREMENTS[low_bit_library]).read_text()
    for name, version in TESTED[low_bit_library].items():
        assert re.search(rf"^{re.escape(name)}(\[[^\]]*\])?=={re.escape(version)}$", requirements, re.M), name


@pytest.mark.parametrize("low_bit_library", TESTED)
def test_a_different_version_is_named(monkeypatch, low_bit_library):
    from importlib import metadata

    monkeypatch.setattr(metadata, "version", lambda name: "9.9.9")
    [line] = version_problems(["transformers"], low_bit_library)
    tested = TESTED[low_bit_library]["transformers"]
    assert "transformers 9.9.9" in line and tested in line and f"pip install transformers=={tested}" in line
    assert version_problems([], low_bit_library) == []


def test_the_library_is_the_one_installed_or_the_one_named(monkeypatch):
    found = library.installed()
    assert library.name() == found[0]
    for name in library.PACKAGES:
        monkeypatch.setenv("RWKV_LIBRARY", name)
        if name in found:
            assert library.name() == name
        else:
            with pytest.raises(UserError, match=f"{name} is not installed here.*make install"):
                library.name()
    monkeypatch.setenv("RWKV_LIBRARY", "bigdl")
    with pytest.raises(UserError, match="bigdl-llm or ipex-llm"):
        library.name()


@pytest.mark.parametrize("name", ["transformers", "the library", "fschat"])
def test_the_installed_versions_are_the_tested_ones(name):
    in_use = library.name()
    assert version_problems([in_use if name == "the library" else name], in_use) == []


def test_after_start_the_library_logs_no_info_lines():
    """bigdl-llm (and ipex-llm) sets up INFO logging when imported (a timestamped line per conversion, in every notebook cell
    that loads a model); start() configures logging first, so that it does not."""
    script = ("import logging; from helpers.runtime import library; from helpers.runtime.startup import start; start(); "
              "library.module('transformers'); "
              "print(logging.getLogger().getEffectiveLevel())")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.stdout.split()[-1] == str(logging.WARNING), result.stderr[-2000:]


def test_the_variables_kept_from_fastchat_are_its_app_settings():
    """FastChat's API server reads these from the environment when imported; helpers' API server removes them
    first and sets them itself, so that one more field in a FastChat upgrade fails here."""
    script = ("import sys; from fastchat.serve.openai_api_server import AppSettings; "  # FastChat logs what print() says
              "sys.__stdout__.write(' '.join(sorted(AppSettings.__fields__)))")
    fields = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, check=True,
                            env={**os.environ, "LOGDIR": ""}).stdout.split()
    assert fields == sorted(settings.FASTCHAT_APP_SETTINGS)
