"""Token-by-token generation for the widgets, with its timings, and long runs."""
import time
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from helpers.measure.timing import timed_greedy_decode
from helpers.runtime.prompt import check_n_predict, format_prompt
from helpers.runtime.whole_characters import WholeCharacters, token_bytes


@dataclass
class StreamResult:
    text: str = ""
    tokens: int = 0
    first_token_s: float = 0.0  # prompt read and first token out
    seconds: float = 0.0
    stopped: bool = False  # True when stopped before n_predict tokens

    @property
    def tokens_per_s(self):
        """Decode speed after the first token."""
        later = self.seconds - self.first_token_s
        return (self.tokens - 1) / later if self.tokens > 1 and later > 0 else 0.0


class _TextStreamer(BaseStreamer):
    """Receives token ids from generate() and hands on the new text, whole characters only."""

    def __init__(self, tokenizer, result, on_text, started):
        self.result, self.on_text, self.started = result, on_text, started
        self.characters = WholeCharacters(token_bytes(tokenizer))
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:  # generate() first sends the prompt
            self.prompt_seen = True
            return
        if self.result.tokens == 0:
            self.result.first_token_s = time.perf_counter() - self.started
        self.result.tokens += 1
        for token in value.flatten().tolist():
            self._show(self.characters.add(token))  # "" while a split UTF-8 character waits

    def end(self):
        self._show(self.characters.end())  # U+FFFD for a character whose bytes did not all come

    def _show(self, piece):
        self.result.text += piece
        if piece and self.on_text:
            self.on_text(piece)


class _StopWhenSet(StoppingCriteria):
    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return self.event is not None and self.event.is_set()


def stream_generate(model, tokenizer, prompt, n_predict=40, on_text=None, stop_event=None, **sampling):
    """Generate from the formatted prompt, calling on_text(piece) as text arrives; returns a StreamResult.

    sampling: do_sample, temperature, top_p, top_k (greedy by default). Setting stop_event ends the
    generation after the current token.
    """
    input_ids = tokenizer(format_prompt(prompt), return_tensors="pt").input_ids
    check_n_predict(n_predict, model.config.context_length)
    sampling.setdefault("do_sample", False)
    result = StreamResult()
    started = time.perf_counter()
    streamer = _TextStreamer(tokenizer, result, on_text, started)
    with torch.inference_mode():
        model.generate(
            input_ids, max_new_tokens=n_predict, pad_token_id=0,
            streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop_event)]), **sampling,
        )
    result.seconds = time.perf_counter() - started
    result.stopped = stop_event is not None and stop_event.is_set() and result.tokens < n_predict
    return result


def long_run(model, tokenizer, prompt, n_tokens=1000):
    """Greedy decode n_tokens after the formatted prompt, recording each token's latency and RSS."""
    return timed_greedy_decode(model, tokenizer(format_prompt(prompt), return_tensors="pt").input_ids, n_tokens)
