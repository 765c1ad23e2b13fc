"""Continuous batching for one model: requests join and leave between decoding steps, and each step reads
one token of every running request with the weights read once for all of them.

A request's prompt is read alone when it joins (helpers.runtime.batching.read_prompt); then it decodes in
the shared step (decode_step) until it has max_new_tokens or its reader cancels it (a stop string, a
client gone), which takes effect before the next step. Greedy requests get the tokens they would get
alone: a sequence's logits do not depend on the batch it is in.

The waiting list is bounded: past `max_queue` requests waiting for a place in the batch, submit() raises
Overloaded, and a request that waited `queue_timeout_s` for a place gets Overloaded too. If the model thread itself fails, every
request gets SchedulerStopped at once, and so does every later submit().
"""
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from helpers.runtime.batching import decode_step, read_prompt
from helpers.runtime.sampling import Sampling

QUEUE_TIMEOUT_S = 30.0  # a request that waited this long for a place is refused (FastChat's API server waits 100 s)


class Overloaded(Exception):
    """No place for a request now; retry_after_s: when one should be free."""

    def __init__(self, message, retry_after_s):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SchedulerStopped(Exception):
    """The model thread has failed: no request can be answered until the worker is restarted."""


@dataclass
class Request:
    """What a reader holds: tokens arrive in `tokens` (anything with put(): a queue.Queue unless the reader
    gives its own) as ints, then None (done) or an Exception."""

    prompt_ids: list
    max_new_tokens: int
    sampling: Sampling
    tokens: object = field(default_factory=queue.Queue)
    submitted_s: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancelled_at_step: int = None


@dataclass
class _Running:
    request: Request
    state: list
    token: int
    count: int = 1
    counts: dict = field(default_factory=dict)  # {token id: times in the answer}, for the penalties


class Scheduler:
    """Runs the model in one thread for every request; submit() and cancel() from any thread."""

    def __init__(self, model, max_batch=16, max_queue=None, queue_timeout_s=QUEUE_TIMEOUT_S):
        self.model, self.max_batch, self.queue_timeout_s = model, max_batch, queue_timeout_s
        self.max_queue = max_batch if max_queue is None else max_queue
        self.lock = threading.Condition()
        self.waiting, self.joining, self.running = deque(), [], []  # joining: prompts being read
        self.closed, self.stopped = False, None  # stopped: what every request gets once the model thread failed
        self.steps = 0  # decoding steps run, each for every running request
        self.admitted = 0  # requests whose prompt was read
        self.cancelled = 0  # requests ended by their reader before their last token (or before their first)
        self.most_steps_after_cancel = 0  # steps a cancelled request was still decoded in, at most
        self.step_s = 0.0  # a recent decoding step's seconds
        self.thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self.thread.start()

    def submit(self, prompt_ids, max_new_tokens, sampling=None, tokens=None):
        """A Request, waiting for a place in the batch. Overloaded when max_queue requests wait already,
        SchedulerStopped when the model thread has failed."""
        request = Request(list(prompt_ids), max_new_tokens, sampling or Sampling())
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
        free = max(0, self.max_batch - len(self.running) - len(self.joining))
        return free + self.max_queue - len(self.waiting)

    def retry_after_s(self):
        """Seconds until a running request will have its last token, at most (a stop string can end it sooner)."""
        remaining = [run.request.max_new_tokens - run.count for run in self.running]
        return max(1, min(60, math.ceil(min(remaining, default=0) * self.step_s)))

    def status(self):
        with self.lock:
            return {"healthy": self.stopped is None, "error": None if self.stopped is None else str(self.stopped),
                    "running": len(self.running), "waiting": len(self.waiting), "room": self._room(),
                    "max_batch": self.max_batch, "max_queue": self.max_queue, "requests_admitted": self.admitted, "steps": self.steps,
                    "cancelled": self.cancelled, "most_steps_after_cancel": self.most_steps_after_cancel,
                    "retry_after_s": self.retry_after_s()}

    def _loop(self):
        try:
            while self._admit():
                self._retire()
                if self.running:
                    self._step()
        except BaseException as error:  # a bug in this loop: fail every request now, not never
            self._fail(error)

    def _fail(self, error):
        with self.lock:
            self.stopped = SchedulerStopped(f"the model thread stopped ({error!r}); restart the worker (make serve does)")
            for request in [run.request for run in self.running] + self.joining + list(self.waiting):
                request.tokens.put(self.stopped)
            self.running.clear()
            self.joining.clear()
            self.waiting.clear()

    def _take_waiting(self):
        """The waiting requests that fit into the batch, once cancelled ones are dropped and those that
        waited too long are refused; waits when there is nothing to do. None once closed and done."""
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
                if self.running or self.waiting:
                    break
                if self.closed:
                    return None
                self.lock.wait()
            self.joining = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.max_batch - len(self.running)))]
            return list(self.joining)

    def _admit(self):
        """Read the prompts of the waiting requests that fit; False once closed and done."""
        joining = self._take_waiting()
        if joining is None:
            return False
        for request in joining:
            try:
                state, logits = read_prompt(self.model, torch.tensor([request.prompt_ids]))
                token = request.sampling.pick(logits)
            except Exception as error:  # reported to the request's reader, the others go on
                with self.lock:
                    self.joining.remove(request)
                request.tokens.put(error)
                continue
            run = _Running(request, state, token)
            request.sampling.count(run.counts, token)
            with self.lock:
                self.running.append(run)
                self.joining.remove(request)
                self.admitted += 1
            request.tokens.put(token)
        return True

    def _retire(self):
        with self.lock:
            for run in [run for run in self.running if run.request.cancelled.is_set() or run.count >= run.request.max_new_tokens]:
                if run.request.cancelled.is_set() and run.count < run.request.max_new_tokens:
                    self.cancelled += 1
                    self.most_steps_after_cancel = max(self.most_steps_after_cancel,
                                                       self.steps - run.request.cancelled_at_step)
                run.request.tokens.put(None)
                self.running.remove(run)

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
