"""Committed runs, data/bench/NAME.json: one reader, which refuses a run measured with other code."""
import json

from helpers.measure import provenance
from helpers.runtime.paths import DATA_DIR


def run_path(name):
    return DATA_DIR / "bench" / f"{name}.json"


def read_run(name):
    """The committed run NAME as its tool wrote it; StaleResults when it was measured with other code than this
    checkout's (its provenance's kind: the kernel, the decoding code, the serving code or the tokenizer)."""
    path = run_path(name)
    run = json.loads(path.read_text())
    provenance.check_current(run["provenance"], path.relative_to(DATA_DIR.parent))
    return run
