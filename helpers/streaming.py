"""Token-by-token generation with timings, batched decoding with timings, and long runs."""
import statistics
import time
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from helpers.prompt import check_n_predict, format_prompt
from helpers.runtime.batching import decode_step, read_prompt
from helpers.runtime.memory import rss_bytes


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
        self.tokenizer, self.result, self.on_text, self.started = tokenizer, result, on_text, started
        self.ids, self.prompt_seen = [], False

    def put(self, value):
        if not self.prompt_seen:  # generate() first sends the prompt
            self.prompt_seen = True
            return
        if self.result.tokens == 0:
            self.result.first_token_s = time.perf_counter() - self.started
        self.result.tokens += 1
        self.ids.extend(value.flatten().tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(self.result.text):  # a split UTF-8 char waits
            piece, self.result.text = text[len(self.result.text):], text
            if self.on_text:
                self.on_text(piece)

    def end(self):
        pass


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


def _forward(model, input_ids, state):
    """One forward exactly as generate() makes it (with the RNN state after the first)."""
    return model(**model.prepare_inputs_for_generation(input_ids, state=state), use_cache=True)


@dataclass
class TimedDecode:
    prefill_ms: float = 0.0  # reading the prompt and producing the first token
    latency_ms: list = field(default_factory=list)  # each later token
    rss_bytes: list = field(default_factory=list)  # the process's RSS after each later token
    tokens: list = field(default_factory=list)


def timed_greedy_decode(model, input_ids, n_tokens, between_tokens=None):
    """Greedy decoding, one forward per token, timing every step; between_tokens(step), if given, runs
    untimed after each step (step 0 reads the prompt)."""
    run, state, token = TimedDecode(), None, input_ids
    with torch.inference_mode():
        for step in range(n_tokens + 1):
            start = time.perf_counter()
            out = _forward(model, token, state)
            token, state = out.logits[:, -1].argmax(-1, keepdim=True), out.state
            elapsed_ms = (time.perf_counter() - start) * 1000
            if step == 0:
                run.prefill_ms = elapsed_ms
            else:
                run.latency_ms.append(elapsed_ms)
                run.rss_bytes.append(rss_bytes())
                run.tokens.append(int(token))
            if between_tokens:
                between_tokens(step)
    return run


def batched_greedy(model, prompts, steps):
    """Greedy decoding of prompts (token ids [1, n] each) together, one token of each per step after
    reading each prompt alone: (the greedy tokens of each sequence, the ms of each step)."""
    states, tokens = [], []
    for ids in prompts:
        state, logits = read_prompt(model, ids)
        states.append(state)
        tokens.append(int(logits.argmax()))
    generated, step_ms = [[token] for token in tokens], []
    for _ in range(steps):
        start = time.perf_counter()
        tokens = decode_step(model, tokens, states).argmax(-1).tolist()
        step_ms.append((time.perf_counter() - start) * 1000)
        for sequence, token in zip(generated, tokens):
            sequence.append(token)
    return generated, step_ms


@dataclass
class BatchedDecode:
    batch: int
    step_ms: list = field(default_factory=list)  # the median step of each round
    same_as_alone: float = 1.0  # share of the sequences whose greedy tokens are those they get alone (worst round)

    @property
    def aggregate_tokens_per_s(self):
        return self.batch * 1000 / statistics.median(self.step_ms)


def measure_batches(model, prompts, batches, steps, rounds):
    """{batch: BatchedDecode} decoding the first `batch` prompts together, the batch sizes taking turns
    within each of `rounds` rounds; each sequence's tokens are checked against decoding it alone."""
    alone = [batched_greedy(model, [ids], steps)[0][0] for ids in prompts[:max(batches)]]
    measured = {batch: BatchedDecode(batch) for batch in batches}
    for _ in range(rounds):
        for batch in batches:
            generated, step_ms = batched_greedy(model, prompts[:batch], steps)
            measured[batch].step_ms.append(statistics.median(step_ms))
            same = sum(g == a for g, a in zip(generated, alone)) / batch
            measured[batch].same_as_alone = min(measured[batch].same_as_alone, same)
    return measured


def long_run(model, tokenizer, prompt, n_tokens=1000):
    """Greedy decode n_tokens after the formatted prompt, recording each token's latency and RSS."""
    return timed_greedy_decode(model, tokenizer(format_prompt(prompt), return_tensors="pt").input_ids, n_tokens)
