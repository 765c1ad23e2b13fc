"""How close a low-bit model stays to the fp32 reference, measured teacher-forced."""
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Agreement:
    top1: float  # share of positions where both models predict the same next token
    cosine: float  # mean cosine similarity of the logits


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
