"""Where a low-bit format's quality cost comes from: each kind of matrix quantized alone, the rest in FP32.

For each of KINDS (the head; the time mix's key, value, receptance and output; the channel mix's key, value and
receptance), bigdl-llm's own converter (``optimize_model(..., modules_to_not_convert=...)``) turns only that
kind's linears into the format, and the model reads the text beside FP32 as helpers.measure.perplexity does:
perplexity, KL from FP32's next-token distribution (mean and 99th percentile) and top-1 agreement, beside the
share of the linear weights the kind holds. Quantized through bigdl-llm's torch path (the fused step reads a
model in one format only).
"""
import json
from dataclasses import dataclass

from helpers.measure.perplexity import QUALITY_DIR, Stream, check_formats, load_fp32, read_beside_fp32
from helpers.runtime import library
from helpers.runtime.errors import UserError
from helpers.runtime.memory import available_bytes, weight_bytes
from helpers.runtime.rwkv_cpu import repair_for_cpu

KINDS = ("head", "attention.key", "attention.value", "attention.receptance", "attention.output",
         "feed_forward.key", "feed_forward.value", "feed_forward.receptance")


@dataclass
class KindRow:
    format: str
    kind: str
    weight_share: float  # of all the linear weights
    perplexity: float
    kl_mean: float
    kl_p99: float
    top1_agreement: float
    tokens: int


def kind_of(name):
    """The KINDS entry a linear's module name belongs to (rwkv.blocks.3.attention.key: attention.key), or None."""
    return next((kind for kind in KINDS if name == kind or name.endswith("." + kind)), None)


def weight_shares(model):
    """{kind: its share of the model's linear weights}."""
    counts = dict.fromkeys(KINDS, 0)
    for name, module in model.named_modules():
        kind = kind_of(name)
        if kind:
            counts[kind] += module.weight.numel()
    total = sum(counts.values())
    return {kind: count / total for kind, count in counts.items()}


def with_kind_quantized(source, low_bit, kind):
    """The FP32 model with only `kind`'s linears in low_bit (the library's converter), repaired for CPU."""
    from helpers.runtime.loading import load_hf_model

    others = [other for other in KINDS if other != kind]  # the library matches them as substrings of module names
    model = library.module().optimize_model(load_hf_model(source), low_bit=low_bit, optimize_llm=False, modules_to_not_convert=others)
    return repair_for_cpu(model)


def measure_kinds(source, ids, low_bit="sym_int4", report=print, progress=True):
    """A KindRow for every kind, each model reading ids beside FP32 (all together where they fit in memory)."""
    check_formats([low_bit])
    if low_bit == "fp32":
        raise UserError("Choose a low-bit format to measure matrix by matrix, such as sym_int4.")
    fp32 = load_fp32(source, report)
    if fp32 is None:
        raise UserError("Measuring matrix by matrix compares with FP32, which does not fit here; use a smaller model.")
    shares = weight_shares(fp32)
    fit_together = weight_bytes(source.config, "fp32") * (len(KINDS) + 1) < 0.8 * available_bytes()
    groups = [list(KINDS)] if fit_together else [[kind] for kind in KINDS]
    rows = []
    for group in groups:
        streams = {(low_bit, kind): Stream(with_kind_quantized(source, low_bit, kind)) for kind in group}
        rows += read_beside_fp32(streams, fp32, ids, f"{low_bit}, {','.join(group)}", progress, fp32_row=False)
    return [KindRow(row.format, row.path, shares[row.path], row.perplexity, row.kl_mean, row.kl_p99,
                    row.top1_agreement, row.tokens) for row in rows]


def load_kind_rows(name):
    """The rows of a committed run, data/quality/NAME.json."""
    return [KindRow(**row) for row in json.loads((QUALITY_DIR / f"{name}.json").read_text())]
