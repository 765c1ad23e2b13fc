"""How a worker reads prompts, measured through the API on this machine: a chat turn by turn (from the state
cache, against the same messages that cannot use it, against the new turn alone), a long system prompt that
many clients send at once (shared, against a different one for each), and running streams while a long
prompt is read (their gaps between tokens before and during it).

    python -m helpers.tools.prompt_bench [--model PATH_OR_ID] [--turns 8] [--clients 16] [--system-tokens 1000]
                                           [--long-tokens 4000] [--streams 8] [--rounds 2]
                                           [--json data/bench/prompts-NAME.json]

The command starts the serving stack (one worker, its default state cache) on the model and prints three
tables; notebook 10 shows the committed run. A request that must not use the cache begins with a line no
other request has (a session number), so it reads everything, as a server without the cache would.
"""
import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import requests

from helpers.measure import provenance
from helpers.measure.client import timed_stream
from helpers.measure.reports import prompts_markdown
from helpers.measure.results import ChatTurn, PromptRun
from helpers.runtime import startup
from helpers.runtime.settings import add_flags, from_flags
from helpers.runtime.errors import UserError, one_line_errors
from helpers.runtime.paths import DATA_DIR

QUESTIONS = ["Who is Prospero?", "Where does the play take place?", "Who is Ariel?", "What does Caliban want?",
             "Who is Miranda's father?", "What happens to the ship?", "Who is Ferdinand?", "How does the play end?",
             "Who is Gonzalo?", "What is the storm for?", "Who is Antonio?", "Why is Ariel bound?",
             "Who is Stephano?", "What is a masque?", "Who is Trinculo?", "Who is Sebastian?"]
TEXT = DATA_DIR / "heldout" / "tempest.txt"  # committed: the text the prompts are cut from


class Client:
    """Streams requests to a stack and reads how many prompt tokens its worker read for each."""

    def __init__(self, stack, model):
        self.url, self.worker_url, self.model = stack.url, stack.workers[0].url, model

    def worker_status(self):
        return requests.post(self.worker_url + "/worker_get_status", timeout=10).json()

    def chat(self, messages, max_tokens, until=None):
        """(answer, ms to its first token) of a greedy streamed chat completion; RuntimeError on an error."""
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        text, times, started, error = timed_stream(self.url + "/v1/chat/completions", body, chat=True, until=until)
        if error or not times:
            raise RuntimeError(f"the server answered a chat with {error or 'no text'}")
        return text, (times[0] - started) * 1000

    def read_while(self, send):
        """(what send() returns, the prompt tokens the worker read meanwhile): one request at a time."""
        before = self.worker_status()["prompt_tokens_read"]
        result = send()
        return result, self.worker_status()["prompt_tokens_read"] - before


def chat_turns(client, turns, rounds, max_tokens=24):
    """A conversation of `turns` questions, `rounds` times (each round its own conversation), every turn sent
    three ways in turn: the conversation so far (its state cached at the last answer's end), the same after a
    line no other request has (read whole), and the new question alone (what it costs to read the new tokens)."""
    results = [ChatTurn(turn + 1, 0) for turn in range(turns)]
    for round_ in range(rounds):
        history, session = [], f"Conversation {round_ + 1}."
        for turn, result in enumerate(results):
            question = {"role": "user", "content": f"{QUESTIONS[turn % len(QUESTIONS)]} ({session})"}
            (_, alone_ms), alone_read = client.read_while(lambda: client.chat([question], 1))
            (answer, cached_ms), cached_read = client.read_while(lambda: client.chat(history + [question], max_tokens))
            unique = {"role": "system", "content": f"Session {time.monotonic_ns()}."}
            _, uncached_ms = client.chat([unique] + history + [question], 1)
            result.alone_ms.append(alone_ms)
            result.alone_read.append(alone_read)
            result.cached_ms.append(cached_ms)
            result.cached_read.append(cached_read)
            result.uncached_ms.append(uncached_ms)
            history += [question, {"role": "assistant", "content": answer}]
            result.prompt_tokens = result.prompt_tokens or _prompt_tokens(client, history[:-1])
    return results


def _prompt_tokens(client, messages):
    body = {"model": client.model, "messages": messages, "max_tokens": 1, "temperature": 0}
    return requests.post(client.url + "/v1/chat/completions", json=body, timeout=300).json()["usage"]["prompt_tokens"]


def cut_text(tokenizer, tokens, start=0):
    """About `tokens` tokens of the committed text, from token `start`, with its blank lines made single line
    breaks (as a chat message is sent)."""
    text = TEXT.read_text(encoding="utf-8").replace("\n\n", "\n")[:8 * (start + tokens)]  # < 8 characters a token
    return tokenizer.decode(tokenizer(text, verbose=False).input_ids[start:start + tokens])  # longer than its context


def system_prompt_rounds(client, system, clients, rounds, max_tokens=8):
    """([first-token ms with one system prompt for all clients], [... with each client's own]): `clients` chats
    sent at once, each with its own question; the two kinds of round alternate. Each round's system prompt
    begins with its own session line, so no round reads another's."""
    shared, separate = [], []
    for round_ in range(rounds):
        for kind, times in (("shared", shared), ("separate", separate)):
            def one(index):
                session = f"Session {round_ + 1}-{kind}{'' if kind == 'shared' else f'-{index}'}."
                messages = [{"role": "system", "content": f"{session}\n{system}"},
                            {"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}]
                return client.chat(messages, max_tokens)[1]

            with ThreadPoolExecutor(clients) as pool:
                times += pool.map(one, range(clients))
    return shared, separate


def long_prompt_while_streaming(client, long_prompt, streams, settle_s=3.0, max_tokens=2000):
    """(gaps in ms between the pieces of `streams` running streams before the long prompt is sent, the gaps
    while it is read, ms to its first token): the streams are closed once it has its first token."""
    done, results = threading.Event(), []
    body = {"model": client.model, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    threads = [threading.Thread(target=lambda: results.append(
        timed_stream(client.url + "/v1/completions", body, until=done))) for _ in range(streams)]
    for thread in threads:
        thread.start()
    time.sleep(settle_s)
    sent = time.monotonic()
    text, times, started, error = timed_stream(client.url + "/v1/completions", {
        "model": client.model, "prompt": long_prompt, "max_tokens": 1, "temperature": 0, "stream": True})
    first = times[0] if times else time.monotonic()
    done.set()
    for thread in threads:
        thread.join()
    if error:
        raise RuntimeError(f"the server answered the long prompt with {error}")
    before, during = [], []
    for _, stream_times, _, _ in results:
        for previous, arrived in zip(stream_times, stream_times[1:]):
            gap = (arrived - previous) * 1000
            if arrived <= sent:
                before.append(gap)
            elif arrived <= first:
                during.append(gap)
    return before, during, (first - started) * 1000


@one_line_errors
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, "model")
    parser.add_argument("--turns", type=int, default=8, help="questions in each conversation")
    parser.add_argument("--clients", type=int, default=16, help="clients sending the system prompt at once")
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--long-tokens", type=int, default=4000, help="the long prompt read while others stream")
    parser.add_argument("--streams", type=int, default=8, help="streams running while the long prompt is read")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the run here")
    args = parser.parse_args(argv)
    startup.start(from_flags(args))
    from helpers.measure.serving_run import serving_run

    try:
        with serving_run(args.model, max_batch=max(args.clients, args.streams + 1)) as serving:
            tokenizer = serving.tokenizer
            long_prompt = cut_text(tokenizer, args.long_tokens, start=args.system_tokens)
            client = Client(serving.stack, serving.model)
            run = PromptRun(chat=chat_turns(client, args.turns, args.rounds))
            run.shared_ms, run.separate_ms = system_prompt_rounds(
                client, cut_text(tokenizer, args.system_tokens), args.clients, args.rounds)
            run.gaps_before_ms, run.gaps_during_ms, run.long_first_ms = long_prompt_while_streaming(
                client, long_prompt, args.streams)
            run.long_prompt_tokens = len(tokenizer(long_prompt).input_ids)
            run.worker = client.worker_status()
    except (UserError, RuntimeError) as error:
        sys.exit(f"Error: {error}")
    settings = {"model": client.model, "turns": args.turns, "clients": args.clients, "system_tokens": args.system_tokens,
                "streams": args.streams, "rounds": args.rounds,
                "provenance": serving.stamp(provenance.command_line("helpers.tools.prompt_bench", argv))}
    print(prompts_markdown(settings, run, targets=True))
    if args.json:
        args.json.write_text(json.dumps({**settings, "run": asdict(run)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
