"""Continuous batching for one model: requests join and leave between decoding steps, and each step reads
one token of every running request with the weights read once for all of them.

Between two steps the scheduler reads a chunk of the prompts waiting to join (several prompts in one
native call where their chunks have the same length), at most about as long as a step takes while requests
are decoding, so that a long prompt slows running streams to about half their pace instead of stopping them.
A prompt that begins with a prefix whose state is cached (helpers.serving.state_cache: chat turns, a shared
system prompt) is read from there; the scheduler keeps the states at the prompt's turn boundaries, at its
end, and at the end of each answer. A prompt that shares a turn with one being read waits until that turn's
state is cached, so that a system prompt sent by many clients at once is read once; it waits only where the
one ahead keeps that state (a turn boundary of its own, or its end), and never without a cache.

A request then decodes in the shared step (decode_step) until it has max_new_tokens or its reader cancels it
(a stop string, a client gone), which takes effect before the next step. Greedy requests get the tokens
they would get alone: a sequence's logits depend neither on the batch it is in nor on how its prompt was
split into chunks (on the fused path; the torch path can differ in the last bits).

The waiting list is bounded: past `max_queue` requests waiting for a place in the batch, submit() raises
Overloaded, and a request that waited `queue_timeout_s` for a place gets Overloaded too. If the model thread
itself fails, every request gets SchedulerStopped at once, and so does every later submit().
"""
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from helpers.runtime.batching import decode_step, read_tokens
from helpers.runtime.rwkv_state import start_state
from helpers.runtime.sampling import Sampling
from helpers.serving.state_cache import STATE_CACHE_MB, StateCache

QUEUE_TIMEOUT_S = 30.0  # a request that waited this long for a place is refused (FastChat's API server waits 100 s)
MIN_CHUNK, MAX_CHUNK = 8, 512  # prompt tokens read between two steps (MAX_CHUNK while none decodes)
CHUNK_GROWTH = 1.25  # the chunk grows by this while it takes under half a step, shrinks while it takes over one


class Overloaded(Exception):
    """No place for a request now; retry_after_s: when one should be free."""

    def __init__(self, message, retry_after_s):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SchedulerStopped(Exception):
    """The model thread has failed: no request can be answered until the worker is restarted."""


@dataclass(eq=False)
class Request:
    """What a reader holds: tokens arrive in `tokens` (anything with put(): a queue.Queue unless the reader
    gives its own) as ints, then None (done) or an Exception. boundaries: prompt lengths after which the
    state is worth keeping (the end of each chat turn)."""

    prompt_ids: list
    max_new_tokens: int
    sampling: Sampling
    boundaries: tuple = ()
    tokens: object = field(default_factory=queue.Queue)
    submitted_s: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancelled_at_step: int = None


@dataclass(eq=False)
class _Reading:
    request: Request
    waits_for: list  # [(a request read ahead of this one, the prompt length up to which they are the same)]
    state: list = None  # None until its first chunk
    read: int = 0  # prompt tokens in the state
    started: int = 0  # prompt tokens in the state it started from (a cached prefix's)

    def next_stop(self):
        """Where the next chunk must end at the latest: the next turn boundary whose state is kept, or the end.
        A boundary fewer than MIN_CHUNK tokens past the state it started from is not kept: that state is nearly
        as good, and ending a chunk there costs another read of the weights."""
        return next((b for b in self.request.boundaries if b > self.read and self.keeps(b)), len(self.request.prompt_ids))

    def keeps(self, length):
        """Whether its state after `length` prompt tokens will be cached (as far as is known before it starts)."""
        return length == len(self.request.prompt_ids) or (
            length in self.request.boundaries and (self.state is None or length >= self.started + MIN_CHUNK))


@dataclass(eq=False)
class _Running:
    request: Request
    state: list
    token: int
    read_ids: list  # the tokens the state has read: the prompt, then every token of the answer but the last
    count: int = 1
    counts: dict = field(default_factory=dict)  # {token id: times in the answer}, for the penalties


class Scheduler:
    """Runs the model in one thread for every request; submit() and cancel() from any thread."""

    def __init__(self, model, max_batch=16, max_queue=None, queue_timeout_s=QUEUE_TIMEOUT_S,
                 state_cache_mb=STATE_CACHE_MB, text_of=None):
        self.model, self.max_batch, self.queue_timeout_s = model, max_batch, queue_timeout_s
        self.max_queue = max_batch if max_queue is None else max_queue
        self.cache = StateCache(state_cache_mb * 2**20, text_of) if state_cache_mb > 0 else None
        self.lock = threading.Condition()
        self.waiting, self.reading, self.running = deque(), [], []  # reading: prompts being read, oldest first
        self.closed, self.stopped = False, None  # stopped: what every request gets once the model thread failed
        self.steps = 0  # decoding steps run, each for every running request
        self.admitted = 0  # requests whose prompt was read
        self.prompt_tokens_read = 0  # prompt tokens the model read (not those whose state came from the cache)
        self.cancelled = 0  # requests ended by their reader before their last token (or before their first)
        self.most_steps_after_cancel = 0  # steps a cancelled request was still decoded in, at most
        self.step_s = 0.0  # a recent decoding step's seconds
        self.chunk_tokens = MIN_CHUNK  # prompt tokens read between two steps while requests decode
        self.thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self.thread.start()

    def submit(self, prompt_ids, max_new_tokens, sampling=None, tokens=None, boundaries=()):
        """A Request, waiting for a place in the batch. Overloaded when max_queue requests wait already,
        SchedulerStopped when the model thread has failed."""
        if not prompt_ids:
            raise ValueError("a request needs a prompt of at least one token")
        kept = _spaced(boundaries, len(prompt_ids)) if self.cache else ()  # without a cache, no state is kept
        request = Request(list(prompt_ids), max_new_tokens, sampling or Sampling(), kept)
        if tokens is not None:
            request.tokens = tokens
        with self.lock:
            if self.stopped is not None:
                raise self.stopped
            if self.closed:
                raise SchedulerStopped("the scheduler is closed")
            if self._room() <= 0:
                raise Overloaded(f"this worker is full: {len(self.running)} requests running and {len(self.waiting)} "
                                 "waiting; retry later", self.retry_after_s())
            self.waiting.append(request)
            self.lock.notify()
        return request

    def cancel(self, request):
        """End a request before its next step (its reader has what it needs, or its client has gone)."""
        with self.lock:
            if not request.cancelled.is_set():
                request.cancelled_at_step = self.steps
                request.cancelled.set()

    def close(self):
        """End the model thread once the requests submitted so far are done (it holds the model until then)."""
        with self.lock:
            self.closed = True
            self.lock.notify()

    def _room(self):
        """Requests that can be submitted now: the places free in the batch and in the queue (lock held)."""
        free = max(0, self.max_batch - len(self.running) - len(self.reading))
        return free + self.max_queue - len(self.waiting)

    def retry_after_s(self):
        """Seconds until a running request will have its last token, at most (a stop string can end it sooner)."""
        remaining = [run.request.max_new_tokens - run.count for run in self.running]
        return max(1, min(60, math.ceil(min(remaining, default=0) * self.step_s)))

    def status(self):
        with self.lock:
            return {"healthy": self.stopped is None, "error": None if self.stopped is None else str(self.stopped),
                    "running": len(self.running), "reading": len(self.reading), "waiting": len(self.waiting),
                    "room": self._room(), "max_batch": self.max_batch, "max_queue": self.max_queue,
                    "requests_admitted": self.admitted, "steps": self.steps, "prompt_tokens_read": self.prompt_tokens_read,
                    "cancelled": self.cancelled, "most_steps_after_cancel": self.most_steps_after_cancel,
                    "retry_after_s": self.retry_after_s(), **(self.cache.status() if self.cache else {})}

    def _loop(self):
        try:
            while self._take_waiting():
                self._retire()
                if self.reading:
                    self._read_chunk()
                if self.running:
                    self._step()
        except BaseException as error:  # a bug in this loop: fail every request now, not never
            self._fail(error)

    def _fail(self, error):
        with self.lock:
            self.stopped = SchedulerStopped(f"the model thread stopped ({error!r}); restart the worker (make serve does)")
            for request in [item.request for item in self.running + self.reading] + list(self.waiting):
                request.tokens.put(self.stopped)
            self.running.clear()
            self.reading.clear()
            self.waiting.clear()

    def _take_waiting(self):
        """Move the waiting requests that fit into the batch to the prompts being read, once cancelled ones are
        dropped and those that waited too long are refused; waits when there is nothing to do. False once
        closed and done."""
        with self.lock:
            while True:
                now = time.monotonic()
                for request in [r for r in self.waiting if r.cancelled.is_set() or now - r.submitted_s > self.queue_timeout_s]:
                    self.waiting.remove(request)
                    if request.cancelled.is_set():
                        self.cancelled += 1
                    else:
                        request.tokens.put(Overloaded(f"no place in the batch within {self.queue_timeout_s:g} s; "
                                                      "retry later", self.retry_after_s()))
                for item in [item for item in self.reading if item.request.cancelled.is_set()]:
                    self.reading.remove(item)
                    self.cancelled += 1
                if self.running or self.waiting or self.reading:
                    break
                if self.closed:
                    return False
                self.lock.wait()
            while self.waiting and len(self.running) + len(self.reading) < self.max_batch:
                request = self.waiting.popleft()
                self.reading.append(_Reading(request, [(item, shared) for item in self.reading
                                                       if (shared := _shared_turns(item.request, request))]))
            return True

    def _read_chunk(self):
        """Read the next chunk of the oldest prompts; a prompt read to its end gets its first token and runs."""
        group, length, budget = self._chunk()
        ids = torch.tensor([item.request.prompt_ids[item.read:item.read + length] for item in group])
        started = time.monotonic()
        try:
            logits = read_tokens(self.model, ids, [item.state for item in group])
        except Exception as error:  # reported to these requests' readers, the others go on
            self._end_reading(group, error)
            return
        if budget < MAX_CHUNK and ids.numel() >= budget:  # a whole chunk between steps: fit the next one to a step
            elapsed = time.monotonic() - started
            if elapsed < 0.5 * self.step_s:
                self.chunk_tokens = min(MAX_CHUNK, int(self.chunk_tokens * CHUNK_GROWTH) + 1)
            elif elapsed > self.step_s:
                self.chunk_tokens = max(MIN_CHUNK, int(self.chunk_tokens / CHUNK_GROWTH))
        self.prompt_tokens_read += ids.numel()
        for item, row in zip(group, logits):
            request, item.read = item.request, item.read + length
            if self.cache and (item.read in request.boundaries or item.read == len(request.prompt_ids)):
                self.cache.put(request.prompt_ids[:item.read], item.state)
            if item.read < len(request.prompt_ids):
                continue
            try:
                token = request.sampling.pick(row)
            except Exception as error:
                self._end_reading([item], error)
                continue
            run = _Running(request, item.state, token, list(request.prompt_ids))
            request.sampling.count(run.counts, token)
            with self.lock:
                self.running.append(run)
                self.reading.remove(item)
                self.admitted += 1
            request.tokens.put(token)

    def _chunk(self):
        """(the prompts read now, tokens of each, the budget): the oldest prompt that can start, up to its next stop and the
        budget, and the next ones that have as many tokens left before their own stop, within the budget. A
        prompt starts from the longest cached prefix of it once the prompts read ahead of it that share a turn
        with it have read past that turn."""
        startable = []
        for item in self.reading:
            if item.state is None:
                if any(other in self.reading and other.read < shared and other.keeps(shared)
                       for other, shared in item.waits_for):
                    continue
                item.read, item.state = self.cache.longest_prefix(item.request.prompt_ids) if self.cache else (0, None)
                config = self.model.config
                item.state = item.state or start_state(config.hidden_size, config.num_hidden_layers)
                item.started = item.read
            startable.append(item)
        budget = self._budget()
        length = min(startable[0].next_stop() - startable[0].read, budget)
        group = [item for item in startable if item.next_stop() - item.read >= length]
        return group[:max(1, budget // length)], length, budget

    def _budget(self):
        """Prompt tokens to read before the next step: while as many requests decode as prompts wait, as many as
        take half a step to one (MIN_CHUNK at least); else MAX_CHUNK, so that
        requests that arrive together join the batch together (the few running wait for the many joining)."""
        return self.chunk_tokens if len(self.running) >= len(self.reading) else MAX_CHUNK

    def _end_reading(self, items, error):
        with self.lock:
            for item in items:
                self.reading.remove(item)
        for item in items:
            item.request.tokens.put(error)

    def _retire(self):
        with self.lock:
            ended = [run for run in self.running if run.request.cancelled.is_set() or run.count >= run.request.max_new_tokens]
            for run in ended:
                if run.request.cancelled.is_set() and run.count < run.request.max_new_tokens:
                    self.cancelled += 1
                    self.most_steps_after_cancel = max(self.most_steps_after_cancel,
                                                       self.steps - run.request.cancelled_at_step)
                run.request.tokens.put(None)
                self.running.remove(run)
        for run in ended:  # the next turn of a chat begins with this prompt and answer
            if self.cache:
                self.cache.put(run.read_ids, run.state)

    def _step(self):
        """One token of every running request. An error (in the model, or sampling from NaN logits) ends
        the requests it concerns with that error, not the thread."""
        started = time.monotonic()
        try:
            logits = decode_step(self.model, [run.token for run in self.running], [run.state for run in self.running])
        except Exception as error:
            with self.lock:
                for run in self.running:
                    run.request.tokens.put(error)
                self.running.clear()
            return
        with self.lock:
            self.steps += 1
            self.step_s = time.monotonic() - started
        for run, row in zip(list(self.running), logits):
            run.read_ids.append(run.token)
            try:
                run.token = run.request.sampling.pick(row, run.counts)
            except Exception as error:
                run.request.tokens.put(error)
                with self.lock:
                    self.running.remove(run)
                continue
            run.request.sampling.count(run.counts, run.token)
            run.count += 1
            run.request.tokens.put(run.token)


def _spaced(boundaries, length):
    """The boundaries inside a prompt of `length` tokens at least MIN_CHUNK tokens after the one before (or the
    start): a state kept a few tokens after another is hardly worth its memory and the weight read it costs."""
    kept = []
    for boundary in sorted(set(boundaries)):
        if boundary - (kept[-1] if kept else 0) >= MIN_CHUNK and boundary < length:
            kept.append(boundary)
    return tuple(kept)


def _shared_turns(earlier, later):
    """The longest prompt prefix of `later` up to one of its turn boundaries that `earlier` begins with too and
    keeps the state of (at one of its own boundaries, or its end), or 0."""
    kept = {*earlier.boundaries, len(earlier.prompt_ids)}
    return max((b for b in later.boundaries if b in kept and earlier.prompt_ids[:b] == later.prompt_ids[:b]), default=0)
