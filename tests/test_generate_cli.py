"""The generate CLI: the upstream example's layout, and one clear line with exit code 2 for bad input."""
import json
import shutil
from pathlib import Path

import pytest

from conftest import run_cli
from helpers.runtime import fused_decode
from helpers.tools import generate
from helpers.measure.checkpoints import make_config
from helpers.runtime.prompt import DRAGON_PROMPT, PROMPT_FORMAT
from helpers.runtime.cpu import CpuInfo
from helpers.runtime.errors import UserError
from helpers.runtime.models import resolve_model
from helpers.runtime.paths import REPO_ROOT

SEPARATORS = ["-------------------- Prompt --------------------", "-------------------- Output --------------------"]


def test_defaults_print_the_upstream_layout(tokenizer):
    result = run_cli("helpers.tools.generate")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Inference time: ") and lines[0].endswith(" s")
    float(lines[0].split()[2])
    prompt = PROMPT_FORMAT.format(prompt=DRAGON_PROMPT)
    head, output = result.stdout.split(SEPARATORS[1] + "\n")
    assert head == f"{lines[0]}\n{SEPARATORS[0]}\n{prompt}\n"
    assert output.startswith(prompt)
    answer_ids = tokenizer(output[len(prompt):].rstrip("\n")).input_ids
    assert 30 <= len(answer_ids) <= 50  # 40 generated tokens; re-tokenizing text may merge or split a few


def test_a_mix_runs_on_the_fused_step(tmp_path):
    result = run_cli("helpers.tools.generate", "--low-bit", "sym_int4_head8", "--n-predict", "5",
                     env={"RWKV_LOW_BIT_CACHE": "0"})
    assert result.returncode == 0, result.stderr
    assert "Decoding: helpers' fused step" in result.stderr or fused_decode.library() is None, result.stderr
    assert result.stdout.count(SEPARATORS[1]) == 1


def write_config(folder, **overrides):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**make_config("tiny"), **overrides}))
    return folder


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "   \n"], "prompt is empty"),
    (["--n-predict", "0"], "between 1 and"),
    (["--n-predict", "5000"], "between 1 and the model's context length 4096"),
    (["--repo-id-or-model-path", "/no/such/model"], "No model folder at /no/such/model"),
    (["--repo-id-or-model-path", "RWKV/rwkv-4-world-7b"], "huggingface-cli download RWKV/rwkv-4-world-7b"),
])
def test_bad_input_gets_one_clear_line(args, message):
    result = run_cli("helpers.tools.generate", *args, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr


def test_folder_without_weights(tmp_path):
    folder = write_config(tmp_path / "empty")
    result = run_cli("helpers.tools.generate", "--repo-id-or-model-path", str(folder))
    assert result.returncode == 2 and "has a config.json but no weights" in result.stderr


def test_not_an_rwkv_checkpoint(tmp_path):
    folder = write_config(tmp_path / "llama", model_type="llama")
    result = run_cli("helpers.tools.generate", "--repo-id-or-model-path", str(folder))
    assert result.returncode == 2 and "'llama' model, not RWKV-4" in result.stderr


def test_model_too_large_for_ram_is_refused_before_loading(tmp_path):
    folder = write_config(tmp_path / "huge", hidden_size=32768, num_hidden_layers=64, intermediate_size=131072)
    (folder / "model.safetensors").write_bytes(b"")  # the refusal must come before any weight is read
    result = run_cli("helpers.tools.generate", "--repo-id-or-model-path", str(folder))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "GiB of RAM, but only" in result.stderr


def test_cpu_without_avx2_is_refused(monkeypatch, capsys):
    monkeypatch.setattr("helpers.runtime.cpu.cpu_info", lambda: CpuInfo("GenuineIntel", "Old CPU", 4, 1, frozenset({"avx"})))
    assert generate.main(["--n-predict", "2"]) == 2
    assert "lacks AVX2" in capsys.readouterr().err


def test_a_hub_id_loads_from_the_hugging_face_cache(hub_source, tmp_path):
    # The hub cache's layout: models--OWNER--NAME/refs/main names the snapshot that holds the files.
    repo = tmp_path / "hub" / "models--RWKV--rwkv-4-world-tiny"
    shutil.copytree(hub_source.location, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    result = run_cli("helpers.tools.generate", "--repo-id-or-model-path", "RWKV/rwkv-4-world-tiny", "--n-predict", "3",
                     env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "RWKV_LOW_BIT_CACHE": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(SEPARATORS[1]) == 1


def test_a_relative_model_folder_is_found_from_the_project_root_too(tiny_source, tmp_path, monkeypatch):
    # RWKV_MODEL=data/models/... make lab: a notebook's kernel runs in notebooks/, not where make ran
    relative = Path(tiny_source.location).relative_to(REPO_ROOT)
    monkeypatch.chdir(tmp_path)
    assert resolve_model(str(relative)).location == str(REPO_ROOT / relative)
    with pytest.raises(UserError, match="No model folder at data/models/no-such-model"):
        resolve_model("data/models/no-such-model")
    # where the working folder has it too, its copy wins, named absolutely (the serving worker runs elsewhere)
    shutil.copytree(tiny_source.location, tmp_path / relative)
    assert resolve_model(str(relative)).location == str(tmp_path / relative)
