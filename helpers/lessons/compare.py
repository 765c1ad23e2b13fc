"""What notebooks 02 and 09 measure: FP32 against low-bit loading, side by side in one kernel."""
import contextlib
import gc
import time
from dataclasses import dataclass

import torch

from helpers.lessons.quality import agreement, logits_for, stepwise_logits
from helpers.runtime import library
from helpers.runtime.errors import UserError
from helpers.runtime.fused_decode import torch_path
from helpers.runtime.memory import PeakRss, check_fits, model_weight_bytes, rss_bytes


@dataclass
class Loaded:
    model: object
    seconds: float
    peak_rss_delta: int  # bytes above the RSS before loading, at the highest point
    rss_delta: int  # bytes still held once loaded

    @property
    def weight_bytes(self):
        return model_weight_bytes(self.model)


def timed_load(load, *args, **kwargs):
    """Call load(*args, **kwargs), timing it and watching the process's memory."""
    gc.collect()
    before = rss_bytes()
    with PeakRss() as memory:
        start = time.perf_counter()
        model = load(*args, **kwargs)
        seconds = time.perf_counter() - start
    return Loaded(model, seconds, memory.peak - before, memory.end - before)


def same_weights(model, other):
    """True when both models hold the same parameters bit for bit, low-bit blocks included."""
    mine, theirs = dict(model.named_parameters()), dict(other.named_parameters())
    return mine.keys() == theirs.keys() and all(
        mine[name].dtype == theirs[name].dtype and torch.equal(mine[name].data, theirs[name].data) for name in mine)


def count_low_bit_linears(model):
    LowBitLinear = library.low_bit_linear().LowBitLinear
    return sum(isinstance(module, LowBitLinear) for module in model.modules())


def fits(config, fmt, loader="from_pretrained"):
    """True when loading the model in `fmt` this way fits in the free RAM; else False, after one line saying so."""
    try:
        check_fits(config, fmt, loader)
        return True
    except UserError as error:
        print(f"skipped: {error}")
        return False


def _agreement_columns(result):
    return [f"{result.top1:.0%}", f"{result.cosine:.4f}"] if result else ["-", "-"]


def upstream_error(source, optimize_model=True):
    """The error the library's RWKV-4 path raises on a CPU without the repair, as one line."""
    auto_model = library.module("transformers").AutoModelForCausalLM
    model = auto_model.from_pretrained(source.location, load_in_4bit=True, optimize_model=optimize_model)
    try:
        logits_for(model, model.dummy_inputs["input_ids"][:, :4] % model.config.vocab_size)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return f"no error: this {library.name()} build runs RWKV-4 on CPU as shipped"


def compare_decode_paths(model, input_ids, reference_logits, prompt_tokens=8):
    """Decoding input_ids token by token through the fused step (where it runs) and through torch + bigdl's
    kernels: {path: (table row, Stepwise run, Agreement with FP32 or None)}; reference_logits: FP32's logits
    at every position, or None."""
    paths = [("torch + bigdl-llm's INT4 kernel", torch_path(model))]
    if model.fused_forward is not None:
        paths.insert(0, ("fused step (one native call)", contextlib.nullcontext()))
    results = {}
    for label, context in paths:
        with context:
            run = stepwise_logits(model, input_ids, prompt_tokens)
        result = agreement(reference_logits[prompt_tokens:], run.logits) if reference_logits is not None else None
        results[label] = [label, f"{run.ms_per_token:.2f} ms", *_agreement_columns(result)], run, result
    return results


DECODE_PATH_HEADERS = ["decoding path", "per token", "top-1 = FP32", "logits cosine"]
