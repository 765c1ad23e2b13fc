"""How close a low-bit model stays to the fp32 reference, measured teacher-forced."""
import statistics
import time
from dataclasses import dataclass

import torch


# The least each format agrees with FP32 (top-1, logits cosine), teacher-forced on data/sample_texts.json.
# Measured on the random-weight tiny checkpoint, which the kernel tests use: sym_int4 0.75 / 0.969, asym_int4
# 0.84 / 0.974, sym_int5 0.88 / 0.992, sym_int8 0.99 / 0.9998. The floors leave room for the rounding of
# each CPU's kernels. What a format costs a trained model is measured by helpers.measure.perplexity.
AGREEMENT_FLOORS = {
    "sym_int4": (0.65, 0.95),
    "asym_int4": (0.65, 0.95),
    "sym_int5": (0.78, 0.985),
    "sym_int8": (0.95, 0.999),
}


@dataclass
class Agreement:
    top1: float  # share of positions where both models predict the same next token
    cosine: float  # mean cosine similarity of the logits

    def above_floor(self, low_bit):
        min_top1, min_cosine = AGREEMENT_FLOORS[low_bit]
        return self.top1 >= min_top1 and self.cosine >= min_cosine


def logits_for(model, input_ids):
    """Logits at every position of input_ids (teacher forcing: the model reads the given tokens)."""
    with torch.inference_mode():
        return model(input_ids).logits[0].float()


def agreement(reference_logits, logits):
    top1 = (reference_logits.argmax(-1) == logits.argmax(-1)).float().mean().item()
    cosine = torch.nn.functional.cosine_similarity(reference_logits, logits, dim=-1).mean().item()
    return Agreement(top1, cosine)


@dataclass
class Stepwise:
    logits: torch.Tensor  # [positions, vocab]
    state: list
    ms_per_token: float  # median


def stepwise_logits(model, input_ids, prompt_tokens=8):
    """Logits at positions prompt_tokens.. of input_ids, read as decoding reads them: the prompt in one
    forward, then one token per forward continuing the RNN state."""
    logits, milliseconds = [], []
    with torch.inference_mode():
        out = model(input_ids[:, :prompt_tokens], use_cache=True)
        for position in range(prompt_tokens, input_ids.shape[1]):
            start = time.perf_counter()
            out = model(input_ids[:, position:position + 1], state=out.state, use_cache=True)
            milliseconds.append((time.perf_counter() - start) * 1000)
            logits.append(out.logits[0, -1].float())
    return Stepwise(torch.stack(logits), out.state, statistics.median(milliseconds))
