"""Choosing the next token from logits: greedy or sampled (temperature, top_k, top_p), after the presence
and frequency penalties on tokens the answer already has.

The penalties are OpenAI's (https://platform.openai.com/docs/advanced-usage/frequency-and-presence-penalties):
a token's logit loses presence_penalty once it has appeared and frequency_penalty for every time it has.
BlinkDL's `rwkv` package samples by default with both at 0.2 and lets each count fade by penalty_decay
(0.996) a token, so a word said long ago is free again (its PIPELINE_ARGS: RWKV_DEFAULTS below).
"""
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5  # a temperature under this means greedy, as in FastChat's own worker


@dataclass
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1  # -1: all tokens
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_decay: float = 1.0  # 1: counts never fade, as in OpenAI's API

    def penalized(self, logits, counts):
        """logits [vocab], less the penalties for the tokens in counts ({token id: times in the answer})."""
        if not counts or not (self.presence_penalty or self.frequency_penalty):
            return logits
        ids = torch.tensor(list(counts))
        times = torch.tensor(list(counts.values()), dtype=logits.dtype)
        logits = logits.clone()
        logits[ids] -= self.presence_penalty + self.frequency_penalty * times
        return logits

    def probabilities(self, logits, counts=None):
        """The distribution pick draws from: after the penalties, the temperature, top_k and top_p (the
        tokens outside them get 0); greedy puts everything on the best token."""
        logits = self.penalized(logits, counts)
        if self.temperature < GREEDY_BELOW:
            return torch.nn.functional.one_hot(logits.argmax(), logits.numel()).to(logits.dtype)
        logits = logits / self.temperature
        if 0 < self.top_k < logits.numel():
            logits = logits.masked_fill(logits < logits.topk(self.top_k).values[-1], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > self.top_p  # keeps the token that crosses top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
        return probs / probs.sum()

    def pick(self, logits, counts=None):
        """The next token id from one sequence's logits [vocab], given the answer's counts so far."""
        if self.temperature < GREEDY_BELOW:
            return int(self.penalized(logits, counts).argmax())
        return int(torch.multinomial(self.probabilities(logits, counts), 1))

    def count(self, counts, token):
        """Add token to the answer's counts, after fading the others by penalty_decay."""
        if self.penalty_decay != 1.0:
            for seen in counts:
                counts[seen] *= self.penalty_decay
        counts[token] = counts.get(token, 0) + 1


# The `rwkv` package's default sampling (its PIPELINE_ARGS, 0.8): temperature 1.0, top_p 0.85.
RWKV_DEFAULTS = Sampling(temperature=1.0, top_p=0.85, presence_penalty=0.2, frequency_penalty=0.2, penalty_decay=0.996)
