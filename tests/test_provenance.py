"""A committed run's fingerprint is over the code that decides its figures: a docstring or comment edited in the
kernel's Python side, a loader or the kernel source keeps every run current; a changed expression makes it stale."""
import re
import shutil

import pytest

from helpers.measure import provenance
from helpers.runtime.paths import REPO_ROOT


@pytest.fixture
def checkout(tmp_path):
    """A copy of the files every committed run's fingerprint reads."""
    for name in {name for names in provenance.CODE.values() for name in names}:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO_ROOT / name, tmp_path / name)
    return tmp_path


def fingerprints(root):
    return {kind: provenance.fingerprint(kind, root) for kind in provenance.CODE}


def edit(root, name, old, new):
    path = root / name
    text = path.read_text()
    assert old in text, (name, old)
    path.write_text(text.replace(old, new, 1))


def test_docstrings_comments_and_layout_leave_every_run_current(checkout):
    before = fingerprints(checkout)
    assert before == fingerprints(REPO_ROOT)
    edit(checkout, "helpers/runtime/loading.py", '"""', '"""A typo fixed, and a sentence more.\n\n')
    edit(checkout, "helpers/runtime/fused_decode.py", "import ctypes\n", "import ctypes  # a comment\n\n\n")
    kernel = (checkout / "helpers/runtime/rwkv4_decode.c").read_text()
    first_comment = re.search(r"/\*.*?\*/|//[^\n]*", kernel, re.S)[0]
    edit(checkout, "helpers/runtime/rwkv4_decode.c", first_comment, first_comment[:2] + " reworded " + first_comment[2:])
    edit(checkout, "helpers/runtime/rwkv4_decode.c", "\n", "\n\n   \n")
    assert fingerprints(checkout) == before


@pytest.mark.parametrize("name, old, new, kinds", [
    ("helpers/runtime/fused_decode.py", "BLOCK = 64", "BLOCK = 32", {"decoding", "serving"}),
    ("helpers/runtime/tensor_loading.py", "def ", "def _unused():\n    return 1\n\n\ndef ", {"decoding", "serving"}),
    ("helpers/runtime/rwkv4_decode.c", "#include", "#define UNUSED 1\n#include", {"kernel", "decoding", "serving"}),
    ("helpers/serving/scheduler.py", "MIN_CHUNK, MAX_CHUNK = 8, 512", "MIN_CHUNK, MAX_CHUNK = 8, 1024", {"serving"}),
])
def test_a_changed_expression_makes_the_runs_of_that_code_stale(checkout, name, old, new, kinds):
    before = fingerprints(checkout)
    edit(checkout, name, old, new)
    after = fingerprints(checkout)
    assert {kind for kind in before if before[kind] != after[kind]} == kinds
