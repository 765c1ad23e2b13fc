"""Committed runs, data/bench/NAME.json: one reader, which refuses a run measured with other code."""
import json
from dataclasses import dataclass, field

from helpers.measure import provenance
from helpers.runtime.paths import DATA_DIR


def run_path(name):
    return DATA_DIR / "bench" / f"{name}.json"


def read_run(name):
    """The committed run NAME as its tool wrote it; StaleResults when it was measured with other code than this
    checkout's (its provenance's kind: the kernel, the decoding code, the serving code or the tokenizer)."""
    path = run_path(name)
    run = json.loads(path.read_text())
    provenance.check_current(run["provenance"], path.relative_to(DATA_DIR.parent))
    return run


@dataclass
class SoakResult:
    requests: int
    clients: int
    outcomes: dict = field(default_factory=dict)  # {"answered", "refused" (a 4xx with one line), "cancelled", "lost": count}
    refused_429: int = 0  # of the refused: full workers (with Retry-After)
    lost: list = field(default_factory=list)  # what the first lost requests got
    seconds: float = 0.0
    rss_mb: dict = field(default_factory=dict)  # the worker's resident memory (MB) after the first requests, after all
    worker: dict = field(default_factory=dict)  # the worker's status at the end

    @property
    def rss_growth(self):
        """The worker's memory after the last request over its memory after the first SOAK_MEASURED_AFTER."""
        return self.rss_mb["after_all"] / self.rss_mb["after_first"] - 1


@dataclass
class ChatTurn:
    turn: int
    prompt_tokens: int  # of the turn with the cache
    cached_ms: list = field(default_factory=list)  # to the first token, each round: the conversation, cache on
    cached_read: list = field(default_factory=list)  # prompt tokens the worker read for it
    uncached_ms: list = field(default_factory=list)  # the same messages after a line no other request has
    alone_ms: list = field(default_factory=list)  # the new message alone, as a conversation of its own
    alone_read: list = field(default_factory=list)


@dataclass
class PromptRun:
    chat: list = field(default_factory=list)  # [ChatTurn]
    shared_ms: list = field(default_factory=list)  # first-token ms of every client, rounds with one system prompt
    separate_ms: list = field(default_factory=list)  # rounds where each client's system prompt is its own
    gaps_before_ms: list = field(default_factory=list)  # running streams' gaps between tokens before the long prompt
    gaps_during_ms: list = field(default_factory=list)  # while it was read
    long_first_ms: float = 0.0  # the long prompt's first token
    long_prompt_tokens: int = 0
    worker: dict = field(default_factory=dict)  # the worker's status at the end
