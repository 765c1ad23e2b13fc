"""The lessons read as lessons: short, the scaffold in place, no test code in what a learner sees."""
import json
import re

import pytest

from helpers.runtime.paths import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
MAX_CELLS, MAX_WORDS = 25, 1200
SCAFFOLD = ["**What you will learn:**", "**Before you start:**", "**Runs in:**", "## What you learned", "**Next:**",
            "**Further reading:**"]


def cells(path):
    return json.loads(path.read_text())["cells"]


def markdown(path):
    return "\n".join("".join(cell["source"]) for cell in cells(path) if cell["cell_type"] == "markdown")


def shown_outputs(path):
    """The text a learner sees under the code cells: printed, and displayed as Markdown or plain text."""
    return "\n".join("".join(output.get("text", "") or output.get("data", {}).get("text/markdown", ""))
                     for cell in cells(path) if cell["cell_type"] == "code" and not is_ci(cell)
                     for output in cell.get("outputs", []))


def is_ci(cell):
    return "ci" in cell["metadata"].get("tags", [])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_a_lesson_is_short(path):
    count, words = len(cells(path)), len(markdown(path).split())
    print(f"{path.name}: {count} cells, {words} words of Markdown")
    assert count <= MAX_CELLS and words <= MAX_WORDS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_a_lesson_has_the_scaffold_and_speaks_to_a_learner(path):
    text = markdown(path)
    assert [part for part in SCAFFOLD if part not in text] == []
    # a lesson's reader has no issues or targets, in its text or in what its cells print
    assert re.findall(r"(?i)\b(issues?|targets?)\b", text + shown_outputs(path)) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_checks_live_in_hidden_cells_kept_for_ci(path):
    code = [cell for cell in cells(path) if cell["cell_type"] == "code"]
    assert [cell["source"] for cell in code if not is_ci(cell) and re.search(r"^\s*assert\b", "".join(cell["source"]), re.M)] == []
    assert all(cell["metadata"].get("jupyter", {}).get("source_hidden") for cell in code if is_ci(cell))


def test_the_checks_see_an_assert_in_a_learners_cell(tmp_path):
    planted = tmp_path / "planted.ipynb"
    notebook = json.loads(NOTEBOOKS[0].read_text())
    notebook["cells"].append({"cell_type": "code", "metadata": {}, "source": ["x = 1\n", "assert x == 1"], "outputs": [],
                              "execution_count": None})
    planted.write_text(json.dumps(notebook))
    with pytest.raises(AssertionError):
        test_checks_live_in_hidden_cells_kept_for_ci(planted)


# What a model cell may take from helpers: the one self-contained repair file, and the optional fused step.
COPYABLE = {"helpers.runtime.rwkv_cpu", "helpers.runtime.fused_decode"}


def helpers_imported_by_model_cells(path):
    """The helpers modules imported by a learner's code cells that call bigdl-llm (or ipex-llm), those outside
    COPYABLE."""
    return [module for cell in cells(path) if cell["cell_type"] == "code" and not is_ci(cell)
            and re.search(r"^\s*(?:from|import) (?:bigdl\.llm|ipex_llm)", "".join(cell["source"]), re.M)
            for module in re.findall(r"^\s*(?:from|import) (helpers[\w.]*)", "".join(cell["source"]), re.M)
            if module not in COPYABLE]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_model_cells_can_be_copied_with_the_repair_file_alone(path):
    assert helpers_imported_by_model_cells(path) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_every_import_of_bigdl_llm_shows_ipex_llms_line(path):
    """A learner on ipex-llm (bigdl-llm's successor) sees the one line that differs, and the cell runs on both."""
    for cell in cells(path):
        source = "".join(cell["source"])
        for submodule, names in re.findall(r"^\s*from bigdl\.llm(\S*) import (.+)$", source, re.M):
            assert re.search(rf"^except ImportError:.*\n(\s+from .+\n)*\s+from ipex_llm{re.escape(submodule)} import "
                             rf"{re.escape(names)}$", source, re.M), (path.name, names)


def test_the_copy_check_sees_a_loader_of_ours_in_a_model_cell(tmp_path):
    planted = tmp_path / "planted.ipynb"
    notebook = json.loads(NOTEBOOKS[0].read_text())
    notebook["cells"].append({"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None, "source": [
        "from bigdl.llm.transformers import AutoModelForCausalLM\n", "from helpers.runtime.loading import load_model"]})
    planted.write_text(json.dumps(notebook))
    assert helpers_imported_by_model_cells(planted) == ["helpers.runtime.loading"]
