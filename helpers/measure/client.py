"""The client side of a load test: timed streams from an OpenAI-compatible server, their latencies, and a load
test of streamed completions sent by many clients at once."""
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import requests

from helpers.measure.workloads import QUESTIONS

STALLED_S = 300  # a stream silent this long counts as an error


@dataclass
class LoadResult:
    clients: int
    sent: int = 0
    seconds: float = 0.0  # from the first request sent to the last answer's end
    tokens: int = 0  # in the answers that reached their end
    first_ms: list = field(default_factory=list)  # from sending to the first text, each complete answer
    last_ms: list = field(default_factory=list)  # from sending to the end of the stream, each complete answer
    errors: list = field(default_factory=list)  # what the other requests got

    @property
    def answered(self):
        return len(self.last_ms)

    @property
    def tokens_per_s(self):
        return self.tokens / self.seconds


def percentile(values, share):
    """The value at `share` (0.5: the median, 0.001 to 0.999) of the values, interpolated between the two nearest
    as statistics.quantiles(method="inclusive") does; NaN for none."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=1000, method="inclusive")[round(share * 1000) - 1]


def timed_stream(url, body, chat=False, until=None):
    """(text, [time.monotonic() when each piece of text arrived], the time it was sent, error or None) of one
    streamed completion to url (a chat completion when chat); `until`: an Event that ends it early (the client
    closes its stream)."""
    started, text, times, finished = time.monotonic(), "", [], False
    try:
        with requests.post(url, json=body, stream=True, timeout=STALLED_S) as response:
            if response.status_code != 200:
                return text, times, started, f"HTTP {response.status_code}: {response.text}"
            for line in response.iter_lines(decode_unicode=True):
                if until is not None and until.is_set():
                    return text, times, started, None
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error_code" in event:
                    return text, times, started, event["text"]
                choice = event["choices"][0]
                piece = (choice["delta"].get("content") if chat else choice["text"]) or ""
                if piece:
                    times.append(time.monotonic())
                text += piece
                finished = finished or choice["finish_reason"] is not None
    except requests.RequestException as error:
        return text, times, started, str(error)
    return text, times, started, None if finished else "the stream ended without a finish_reason"


def by_clients(results):
    """{clients: [the LoadResult of each round]}, in order of clients."""
    return {clients: [r for r in results if r.clients == clients] for clients in sorted({r.clients for r in results})}


def latencies_ms(rounds, until):
    """Milliseconds from sending to the "first" or the "last" token, of every complete answer of the rounds."""
    return [ms for result in rounds for ms in getattr(result, f"{until}_ms")]


def _stream(url, body):
    """(text, ms to the first text or None, ms to the end, error or None) of one streamed completion."""
    text, times, started, error = timed_stream(url, body)
    if error:
        return text, None, None, error
    return text, (times[0] - started) * 1000 if times else None, (time.monotonic() - started) * 1000, None


def load_test(url, model, clients, requests_count, max_tokens, count_tokens, prompts=QUESTIONS, time_limit_s=120):
    """Send requests_count streamed greedy completions of the prompts (in turn) to url's /v1/completions,
    `clients` at a time; after time_limit_s no more are sent (those running finish). count_tokens(text)
    counts the tokens of an answer (a stream does not say; encoding the text again can give a token or so
    fewer than were generated)."""
    deadline = time.monotonic() + time_limit_s

    def one(index):
        if time.monotonic() > deadline:
            return None
        body = {"model": model, "prompt": prompts[index % len(prompts)], "max_tokens": max_tokens,
                "temperature": 0, "stream": True}
        return _stream(url + "/v1/completions", body)

    result, start = LoadResult(clients), time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        answers = [answer for answer in pool.map(one, range(requests_count)) if answer is not None]
    result.seconds, result.sent = time.monotonic() - start, len(answers)
    for text, first_ms, last_ms, error in answers:
        if error:
            result.errors.append(error)
            continue
        result.tokens += count_tokens(text)
        result.last_ms.append(last_ms)
        if first_ms is not None:
            result.first_ms.append(first_ms)
    return result
