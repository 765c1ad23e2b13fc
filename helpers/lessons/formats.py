"""Notebook 12's tables beside the committed runs' (helpers.measure.reports.formats_table): what each format and mix
takes in memory, from a config alone, and another tool's figures."""
import json

from helpers.measure.perplexity import QUALITY_DIR
from helpers.measure.reports import bits, markdown
from helpers.runtime.formats import CHOICES
from helpers.runtime.memory import GIB, parameter_counts, weight_bytes


def memory_table(configs):
    """Bits per weight of each format and mix, and the weights' bytes in memory for each {name: config}; last,
    the head's share of each model's linear weights (what a mix keeps at more bits)."""
    headers = ["format", "bits per weight"] + [f"{name} (x sym_int4)" for name in configs]
    rows = []
    for low_bit in CHOICES:
        sizes = [(weight_bytes(config, low_bit), weight_bytes(config, "sym_int4")) for config in configs.values()]
        rows.append([low_bit, bits(low_bit)] + [f"{_size(size)} ({size / plain:.3f}x)" for size, plain in sizes])
    rows.append(["the head's share of the linear weights", ""] + [f"{head_share(config):.1%}" for config in configs.values()])
    return markdown(headers, rows)


def head_share(config):
    """The head's share of an RWKV-4 model's linear weights, from its config alone."""
    return config["vocab_size"] * config["hidden_size"] / parameter_counts(config)[0]


def _size(nbytes):
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


def outside_table(name):
    """An outside tool's figures, data/quality/NAME.json: its source, and its rows as a table."""
    run = json.loads((QUALITY_DIR / f"{name}.json").read_text())
    fp32 = run["rows"][0]["perplexity"]
    rows = [[row["format"], row["head"], f"{row['perplexity']:.3f}", f"{row['perplexity'] / fp32 - 1:+.2%}"]
            for row in run["rows"]]
    return run["source"] + "\n\n" + markdown(["format", "head kept in", "perplexity", "against FP32"], rows)
