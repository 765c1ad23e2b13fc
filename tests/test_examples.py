"""The copyable example scripts run as a learner would run them."""
import ast
import os
import subprocess
import sys

import pytest

from helpers.runtime.prompt import PROMPT_FORMAT
from helpers.runtime.paths import REPO_ROOT

SEPARATORS = ["-------------------- Prompt --------------------", "-------------------- Output --------------------"]


def run_example(*args, **env):
    full_env = {name: value for name, value in {**os.environ, "RWKV_MODEL": None, **env}.items() if value is not None}
    return subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "generate.py"), *args],
                          capture_output=True, text=True, env=full_env, timeout=300, cwd="/")


@pytest.mark.parametrize("model", ["the model trained here", "hub layout"])
def test_generate_example_prints_the_upstream_layout(trained_source, hub_source, tokenizer, model):
    args = ["--n-predict", "6"] + (["--repo-id-or-model-path", hub_source.location] if model == "hub layout" else [])
    result = run_example(*args)
    assert result.returncode == 0, result.stderr
    prompt = PROMPT_FORMAT.format(prompt="What is AI?")
    head, output = result.stdout.split(SEPARATORS[1] + "\n")
    assert head.startswith("Inference time: ") and head.endswith(f"{SEPARATORS[0]}\n{prompt}\n")
    assert output.startswith(prompt)
    assert 1 <= len(tokenizer(output[len(prompt):].rstrip("\n")).input_ids) <= 10  # 6 new tokens, re-tokenized


def test_generate_example_stands_alone():
    """A learner copies examples/generate.py into a project of their own: it imports no module of this one."""
    tree = ast.parse((REPO_ROOT / "examples" / "generate.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"argparse", "os", "time", "pathlib", "torch", "bigdl", "ipex_llm", "transformers"}
