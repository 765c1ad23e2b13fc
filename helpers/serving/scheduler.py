"""Continuous batching for one model: requests join and leave between decoding steps, and each step reads
one token of every running request with the weights read once for all of them.

A request's prompt is read alone when it joins (helpers.runtime.batching.read_prompt); then it decodes in
the shared step (decode_step) until it has max_new_tokens or its reader cancels it (a stop string, a
closed connection). Greedy requests get the tokens they would get alone: a sequence's logits do not
depend on the batch it is in.
"""
import queue
import threading
from dataclasses import dataclass, field

import torch

from helpers.runtime.batching import decode_step, read_prompt
from helpers.runtime.sampling import Sampling


@dataclass
class Request:
    """What a reader holds: tokens arrive in `tokens` as ints, then None (done) or an Exception."""

    prompt_ids: list
    max_new_tokens: int
    sampling: Sampling
    tokens: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self):
        self.cancelled.set()


@dataclass
class _Running:
    request: Request
    state: list
    token: int
    count: int = 1
    counts: dict = field(default_factory=dict)  # {token id: times in the answer}, for the penalties


class Scheduler:
    """Runs the model in one thread for every request; submit() from any thread."""

    def __init__(self, model, max_batch=16):
        self.model, self.max_batch = model, max_batch
        self.waiting = queue.Queue()
        self.running = []
        self.steps = 0  # decoding steps run, each for every running request
        self.admitted = 0  # requests whose prompt was read
        self.thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self.thread.start()

    def submit(self, prompt_ids, max_new_tokens, sampling=None):
        request = Request(list(prompt_ids), max_new_tokens, sampling or Sampling())
        self.waiting.put(request)
        return request

    def close(self):
        """End the model thread once the running requests are done (it holds the model until then)."""
        self.waiting.put(None)

    def _loop(self):
        accepting = True
        while accepting or self.running:
            if accepting:
                accepting = self._admit(block=not self.running)
            self._retire()
            if self.running:
                self._step()

    def _admit(self, block):
        """Read the prompts of waiting requests while the batch has room (waiting for one when idle);
        False once closed."""
        while len(self.running) < self.max_batch:
            try:
                request = self.waiting.get(block=block)
            except queue.Empty:
                return True
            if request is None:
                return False
            block = False
            if request.cancelled.is_set():
                continue
            try:
                state, logits = read_prompt(self.model, torch.tensor([request.prompt_ids]))
                token = request.sampling.pick(logits)
            except Exception as error:  # reported to the request's reader, the others go on
                request.tokens.put(error)
                continue
            request.tokens.put(token)
            run = _Running(request, state, token)
            request.sampling.count(run.counts, token)
            self.running.append(run)
            self.admitted += 1
        return True

    def _retire(self):
        for run in [run for run in self.running if run.request.cancelled.is_set() or run.count >= run.request.max_new_tokens]:
            run.request.tokens.put(None)
            self.running.remove(run)

    def _step(self):
        """One token of every running request. An error (in the model, or sampling from NaN logits) ends
        the requests it concerns with that error, not the thread."""
        try:
            logits = decode_step(self.model, [run.token for run in self.running], [run.state for run in self.running])
        except Exception as error:
            for run in self.running:
                run.request.tokens.put(error)
            self.running.clear()
            return
        self.steps += 1
        for run, row in zip(list(self.running), logits):
            try:
                run.token = run.request.sampling.pick(row, run.counts)
            except Exception as error:
                run.request.tokens.put(error)
                self.running.remove(run)
                continue
            run.request.sampling.count(run.counts, run.token)
            run.count += 1
            run.request.tokens.put(run.token)
