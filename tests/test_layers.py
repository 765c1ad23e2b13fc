"""The layout's rule: helpers' folders are layers, and a module imports only from its own layer or below.
Also: importing a module does no work (no bigdl-llm, no native library chosen)."""
import ast
import json
import os
import subprocess
import sys

from helpers.runtime.paths import REPO_ROOT

LAYERS = ["runtime", "serving", "measure", "tools", "lessons"]  # lowest first


def module_name(path):
    return ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")


def layer(module):
    if module == "helpers":
        return 0
    return LAYERS.index(module.split(".")[1])


def helpers_imports(source):
    """Every helpers module a source imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("helpers")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("helpers"):
            for alias in node.names:  # `from helpers.runtime import settings` imports a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if (REPO_ROOT / (candidate.replace(".", "/") + ".py")).exists() else node.module)
    return found


def upward_imports(path):
    importer = module_name(path)
    return [f"{importer} imports {imported}" for imported in sorted(helpers_imports(path.read_text()))
            if imported != "helpers" and layer(imported) > layer(importer)]


MODULES = sorted((REPO_ROOT / "helpers").rglob("*.py"))


def test_every_module_is_in_a_layer():
    for path in MODULES:
        name = module_name(path)
        assert name == "helpers" or name.split(".")[1] in LAYERS, name


def test_no_module_imports_from_a_layer_above_its_own():
    assert [line for path in MODULES for line in upward_imports(path)] == []


def test_the_check_sees_an_upward_import(tmp_path):
    planted = REPO_ROOT / "helpers" / "runtime" / "planted_for_test.py"
    planted.write_text("def f():\n    from helpers.lessons.plots import plot_load\n")
    try:
        assert upward_imports(planted) == ["helpers.runtime.planted_for_test imports helpers.lessons.plots"]
    finally:
        planted.unlink()


def import_cycles(graph):
    """The cycles of an import graph {module: modules it imports}, each as its modules from the first found."""
    cycles, done = [], set()

    def visit(module, path):
        if module in path:
            cycles.append(path[path.index(module):])
            return
        if module in done:
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    return cycles


def test_no_module_imports_itself_by_way_of_others():
    graph = {module_name(path): helpers_imports(path.read_text()) - {"helpers"} for path in MODULES}
    assert import_cycles(graph) == []
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}) == [["a", "b", "c"]]  # the check sees one


def test_the_lessons_plumbing_imports_no_command_line_tool():
    assert [f"{module_name(path)} imports {imported}" for path in MODULES if module_name(path).startswith("helpers.lessons")
            for imported in sorted(helpers_imports(path.read_text())) if imported.startswith("helpers.tools")] == []


def notebook_code(path):
    """A notebook's code cells as one Python source (IPython's magics and shell lines left out)."""
    cells = json.loads(path.read_text())["cells"]
    return "\n".join(line for cell in cells if cell["cell_type"] == "code"
                     for line in "".join(cell["source"]).splitlines() if not line.lstrip().startswith(("%", "!")))


def test_the_lessons_import_no_command_line_tool():
    """A lesson calls the runtime, serving and measuring layers; a tool is for the shell."""
    assert [f"{path.name} imports {imported}" for path in sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
            for imported in sorted(helpers_imports(notebook_code(path))) if imported.startswith("helpers.tools")] == []


def imported_after(modules, tmp_path):
    """(the libraries of bigdl, ipex_llm, fastchat that importing modules imported, whether a native library was chosen),
    in a fresh process whose environment names none."""
    answer = tmp_path / "imported.txt"
    script = (f"import os, sys; import {', '.join(modules)}; "
              f"open({str(answer)!r}, 'w').write(' '.join(sorted({{name.split('.')[0] for name in sys.modules}} & "
              "{'bigdl', 'ipex_llm', 'fastchat'})) + '|' + str('LLAMA_CPP_LIB' in os.environ))")
    env = {key: value for key, value in os.environ.items() if key != "LLAMA_CPP_LIB"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    libraries, chosen = answer.read_text().split("|")
    return libraries, chosen == "True"


def test_importing_does_no_work(tmp_path):
    """Every module imports without the low-bit library (so without an AVX CPU) and without choosing a native
    library: bigdl-llm or ipex-llm is imported by the calls that load a model, after start(). Only the API server and the worker's
    class (which the worker's main imports once the process is pinned) import FastChat."""
    with_fastchat = {"helpers.serving.api_server", "helpers.serving.rwkv_worker"}
    modules = sorted({module_name(path) for path in MODULES} - with_fastchat)
    assert imported_after([m for m in modules if not m.endswith("__main__")], tmp_path) == ("", False)
    for module in sorted(with_fastchat):
        assert imported_after([module], tmp_path) == ("fastchat", False)
