"""The worker's state cache and chunked prompt reading (helpers.serving.state_cache, helpers.serving.scheduler):
a prompt read in chunks, or from a cached prefix's state, gets the greedy tokens of reading it whole
(model.generate, the reference), and the cache stays within its memory."""
import time

import pytest
import torch

from helpers.runtime.batching import read_tokens
from helpers.runtime.loading import load_model
from helpers.runtime.sampling import Sampling
from helpers.runtime.whole_characters import token_bytes
from helpers.serving import scheduler as scheduler_module
from helpers.serving.scheduler import MIN_CHUNK, Request, Scheduler, _Reading, _shared_turns
from helpers.serving.state_cache import StateCache, state_bytes
from helpers.serving.rwkv_worker import turn_boundaries

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def model(tiny_source):
    return load_model(tiny_source)


def reference(model, ids, new_tokens=NEW_TOKENS):
    """The greedy tokens of reading the whole prompt in one call, then decoding alone."""
    output = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
    return output[0, len(ids):].tolist()


def served(request, timeout_s=60):
    tokens = list(iter(lambda: request.tokens.get(timeout=timeout_s), None))
    assert all(isinstance(token, int) for token in tokens), tokens
    return tokens


def fake_state(value, size=1000):
    return [torch.full((1, size), float(value)) for _ in range(5)]


def test_the_longest_cached_prefix_is_found_and_copied():
    cache = StateCache(max_bytes=10 * 2**20)
    cache.put([1, 2], fake_state(2))
    cache.put([1, 2, 3, 4], fake_state(4))
    cache.put([9], fake_state(9))
    length, state = cache.longest_prefix([1, 2, 3, 4, 5])
    assert length == 4 and state[0][0, 0] == 4
    state[0] += 1  # the caller's copy: the cached state is unchanged
    assert cache.longest_prefix([1, 2, 3, 4, 6])[1][0][0, 0] == 4
    assert cache.longest_prefix([1, 2, 3, 4])[0] == 2  # at least one token left to read: its logits
    assert cache.longest_prefix([2, 1]) == (0, None)
    status = cache.status()
    assert (status["state_cache_hits"], status["state_cache_misses"], status["state_cache_tokens_reused"]) == (3, 1, 10)


def test_the_cache_stays_within_its_memory_and_evicts_the_least_recently_used():
    entry = state_bytes(fake_state(0)) + 4 * 3  # a state and its key of 3 tokens
    cache = StateCache(max_bytes=3 * entry)
    for first in range(3):
        cache.put([first, 0, 0], fake_state(first))
    cache.longest_prefix([0, 0, 0, 7])  # used: 1 is now the least recently used
    cache.put([3, 0, 0], fake_state(3))
    assert cache.longest_prefix([1, 0, 0, 7]) == (0, None)
    assert [cache.longest_prefix([first, 0, 0, 7])[0] for first in (0, 2, 3)] == [3, 3, 3]
    assert cache.bytes <= cache.max_bytes and cache.status()["state_cache_entries"] == 3
    cache.put([5] * 10**6, fake_state(5))  # larger than the whole cache: not kept, nothing evicted for it
    assert cache.status()["state_cache_entries"] == 3


def test_a_prompt_finds_the_tokens_of_the_longest_cached_text_it_begins_with(tokenizer):
    # The texts come from the World vocabulary's bytes, not from the tokenizer: " " then " I" is a way to write
    # "  I" that the tokenizer does not take ("  " then "I"), and "é" is two bytes that may come in two tokens.
    vocabulary = token_bytes(tokenizer)
    ids_of = {text: token for token, text in vocabulary.items()}
    cache = StateCache(max_bytes=10 * 2**20, text_of=lambda ids: b"".join(vocabulary[token] for token in ids))
    space, space_i = ids_of[b" "], ids_of[b" I"]
    assert tokenizer("  I am").input_ids[:2] != [space, space_i]
    cache.put([space, space_i], fake_state(1))
    cache.put([space], fake_state(2))
    assert cache.longest_text("  I am".encode()) == ([space, space_i], 3)
    assert cache.longest_text("  I".encode()) == ([space], 1)  # something is left to read
    assert cache.longest_text("I am".encode()) == ([], 0)
    cache.put([ids_of[b"\xc3"]], fake_state(3))  # the first byte of "é" alone: the rest is not a text
    assert cache.longest_text("é".encode()) == ([], 0)


def test_turn_boundaries_are_after_each_blank_line(tokenizer):
    prompt = "You are kind.\n\nUser: hi\n\nAI: Hello.\n\nUser: more\n\nAI:"
    ids = tokenizer(prompt).input_ids
    boundaries = turn_boundaries(tokenizer.convert_ids_to_tokens(ids))
    texts = [tokenizer.decode(ids[:b]) for b in boundaries]
    assert texts == ["You are kind.\n\n", "You are kind.\n\nUser: hi\n\n", "You are kind.\n\nUser: hi\n\nAI: Hello.\n\n",
                     "You are kind.\n\nUser: hi\n\nAI: Hello.\n\nUser: more\n\n"]
    assert turn_boundaries([b"a\n\n", b"b"]) == [1]  # tokenizers that give bytes


def test_a_long_prompt_is_read_in_chunks_while_others_decode_and_gets_its_own_tokens(model):
    long_prompt = [(7 * i) % 500 + 1 for i in range(600)]
    scheduler = Scheduler(model, max_batch=4, state_cache_mb=0)
    try:
        running = scheduler.submit([5, 6, 7], max_new_tokens=3000)
        assert isinstance(running.tokens.get(timeout=60), int)
        steps_before = scheduler.status()["steps"]
        long = scheduler.submit(long_prompt, max_new_tokens=NEW_TOKENS)
        first = long.tokens.get(timeout=120)
        steps_while_reading = scheduler.status()["steps"] - steps_before
        tokens = [first] + served(long)
        scheduler.cancel(running)
        assert served(running)  # it went on decoding, then ended
    finally:
        scheduler.close()
    assert tokens == reference(model, long_prompt)
    # read in chunks between steps: at least one step per chunk, and more than one chunk
    assert 1 < steps_while_reading <= len(long_prompt) // MIN_CHUNK + 2
    assert scheduler.status()["prompt_tokens_read"] == 3 + len(long_prompt)


def test_a_prompt_that_begins_with_a_cached_prefix_reads_only_the_rest(model):
    system = [(11 * i) % 400 + 2 for i in range(40)]
    first, second = system + [21, 22, 23], system + [31, 32, 33, 34]
    scheduler = Scheduler(model, max_batch=2)
    try:
        answer = served(scheduler.submit(first, NEW_TOKENS, boundaries=[len(system)]))
        read_before = scheduler.status()["prompt_tokens_read"]
        again = served(scheduler.submit(second, NEW_TOKENS, boundaries=[len(system)]))
        status = scheduler.status()
        # a chat's next turn: the first prompt, its answer, then new tokens, from the state kept at the answer's end
        turn = first + answer + [41, 42]
        read_before_turn = status["prompt_tokens_read"]
        next_turn = served(scheduler.submit(turn, NEW_TOKENS))
        read_for_turn = scheduler.status()["prompt_tokens_read"] - read_before_turn
    finally:
        scheduler.close()
    assert answer == reference(model, first) and again == reference(model, second)
    assert next_turn == reference(model, turn)
    assert status["prompt_tokens_read"] - read_before == 4 and status["state_cache_hits"] == 1
    assert read_for_turn == 3  # the answer's last token (never read while decoding) and the two new ones
    assert status["state_cache_mb"] <= status["state_cache_max_mb"]


def shared_system_prompt(model, state_cache_mb):
    """(the prompts, the scheduler's status) of 4 prompts that begin with one 200-token system prompt, sent at
    once; each gets the greedy answer of reading it whole."""
    system = [(13 * i) % 300 + 3 for i in range(200)]
    prompts = [system + [50 + i] * (1 + i) for i in range(4)]
    scheduler = Scheduler(model, max_batch=4, state_cache_mb=state_cache_mb)
    try:
        requests = [scheduler.submit(ids, NEW_TOKENS, boundaries=[len(system)]) for ids in prompts]
        answers = [served(request) for request in requests]
        status = scheduler.status()
    finally:
        scheduler.close()
    assert answers == [reference(model, ids) for ids in prompts]
    return prompts, status


def test_a_shared_system_prompt_sent_by_many_at_once_is_read_once(model):
    prompts, status = shared_system_prompt(model, state_cache_mb=256)
    assert status["prompt_tokens_read"] == 200 + sum(1 + i for i in range(4))
    assert status["state_cache_hits"] == 3


def test_a_cancelled_prompt_is_dropped_before_its_next_chunk(model):
    scheduler = Scheduler(model, max_batch=2, state_cache_mb=0)
    try:
        running = scheduler.submit([5, 6, 7], max_new_tokens=3000)
        running.tokens.get(timeout=60)
        long = scheduler.submit([9] * 4000, max_new_tokens=4)
        while scheduler.status()["prompt_tokens_read"] < 3 + MIN_CHUNK:
            time.sleep(0.01)
        scheduler.cancel(long)
        deadline = time.monotonic() + 30
        while scheduler.status()["reading"] and time.monotonic() < deadline:
            time.sleep(0.01)
        status = scheduler.status()
        scheduler.cancel(running)
    finally:
        scheduler.close()
    assert status["reading"] == 0 and status["cancelled"] == 1
    assert status["prompt_tokens_read"] < 3 + 4000 // 2



def rows_read(monkeypatch):
    """The prompts in each native call that reads prompt chunks, as the scheduler makes them."""
    calls = []

    def recorded(model, ids, states):
        calls.append(len(ids))
        return read_tokens(model, ids, states)

    monkeypatch.setattr(scheduler_module, "read_tokens", recorded)
    return calls


def test_without_a_cache_prompts_that_share_a_prefix_are_read_together(model, monkeypatch):
    calls = rows_read(monkeypatch)
    prompts, status = shared_system_prompt(model, state_cache_mb=0)
    assert calls[0] > 1  # none waited for a state that no cache would keep
    assert status["prompt_tokens_read"] == sum(map(len, prompts))


def test_a_prompt_waits_only_for_a_turn_the_one_ahead_keeps():
    system = list(range(1, 41))
    completion = Request(system + [7] * 30, 4, Sampling())  # no turn boundaries: only its end is kept
    chat = Request(system + [8], 4, Sampling(), boundaries=(40,))
    assert _shared_turns(completion, chat) == 0
    assert _shared_turns(Request(system + [9], 4, Sampling(), boundaries=(40,)), chat) == 40
    assert _shared_turns(Request(system, 4, Sampling()), chat) == 40  # ends there: its end is kept
    ahead = _Reading(Request(system + [9], 4, Sampling(), boundaries=(40,)), [])
    assert ahead.keeps(40)
    ahead.state, ahead.started = [], 36  # started from a cached state of 36 tokens: 40 is too close to keep
    assert not ahead.keeps(40) and ahead.keeps(41)
