"""What every path shares about a sequence: the state before its first token, and the ids that may enter it.

A state is transformers' five float32 tensors [sequences, hidden, layers]: the token shifts of the attention
and the channel mix, and the WKV recurrence's numerator, denominator and running maximum of its exponents.
"""
import torch

from helpers.runtime.rwkv_cpu import NO_MAXIMUM


def start_state(hidden, layers, sequences=1):
    """The state before any token: zeros, and NO_MAXIMUM for the running maximum."""
    state = [torch.zeros(sequences, hidden, layers) for _ in range(5)]
    state[4].fill_(NO_MAXIMUM)
    return state


def check_token_ids(ids, vocab):
    """ValueError unless every id in the tensor ids is one of the vocabulary's 0 .. vocab - 1."""
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < vocab:
        raise ValueError(f"token ids must be between 0 and {vocab - 1}, the model's vocabulary")
