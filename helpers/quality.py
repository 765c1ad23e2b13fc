"""How close a low-bit model stays to the fp32 reference, measured teacher-forced."""
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
