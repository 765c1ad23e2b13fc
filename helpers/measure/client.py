"""The client side of a load test: timed streams from an OpenAI-compatible server, and their latencies."""
import json
import time
from dataclasses import dataclass, field

import requests

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
    """The value at `share` (0.5: the median) of the sorted values (the nearest rank); NaN for none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))] if ordered else float("nan")


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
