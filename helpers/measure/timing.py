"""Timed decoding, as the benchmark and the lessons measure it: one sequence token by token, and several
sequences in batched steps, with every step's time."""
import statistics
import time
from dataclasses import dataclass, field

import torch

from helpers.runtime.batching import decode_step, read_prompt
from helpers.runtime.memory import rss_bytes
from helpers.runtime.prompt import DEFAULT_N_PREDICT, check_n_predict, format_prompt


def seconds(fn):
    """The wall-clock seconds one call of fn takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start

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


def warm_prefill_ms(model, input_ids, rounds):
    """The median ms of `rounds` reads of the prompt from the start, as the first step of timed_greedy_decode
    reads it. Its own first read also touches buffers and weights for the first time, and varies with what
    the machine did before; these come after it."""
    with torch.inference_mode():
        return statistics.median(seconds(lambda: _forward(model, input_ids, None)) for _ in range(rounds)) * 1000


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


@dataclass
class Generation:
    prompt: str  # the formatted prompt
    output: str  # decoded prompt + answer, as the upstream example prints it
    seconds: float
    new_tokens: int

    def report(self):
        return "\n".join([
            f"Inference time: {self.seconds} s",
            "-" * 20 + " Prompt " + "-" * 20,
            self.prompt,
            "-" * 20 + " Output " + "-" * 20,
            self.output,
        ])


def generate(model, tokenizer, prompt, n_predict=DEFAULT_N_PREDICT, **generate_kwargs):
    """Format the prompt, generate greedily (unless told otherwise) and time it."""
    formatted = format_prompt(prompt)
    check_n_predict(n_predict, model.config.context_length)
    input_ids = tokenizer(formatted, return_tensors="pt").input_ids
    generate_kwargs.setdefault("do_sample", False)
    with torch.inference_mode():
        start = time.perf_counter()
        output = model.generate(input_ids, max_new_tokens=n_predict, pad_token_id=0, **generate_kwargs)
        seconds = time.perf_counter() - start
    text = tokenizer.decode(output[0], skip_special_tokens=True)
    return Generation(formatted, text, seconds, output.shape[1] - input_ids.shape[1])
