"""A load test of an OpenAI-compatible server on this machine: a fixed number of streamed greedy
completions, a fixed number of clients at a time; it stops by itself. Or a soak: many requests of mixed
kinds, to see that every one is answered or refused with a line and that the worker's memory holds.

    python -m helpers.tools.load_test [--model PATH_OR_ID] [--clients 1,4,16] [--requests 16] [--max-tokens 64]
                                        [--rounds 3] [--step] [--json data/bench/serving-NAME.json]
    python -m helpers.tools.load_test --soak 2000 [--clients 16] [--max-batch 8 --max-queue 4]
                                        [--json data/bench/soak-NAME.json]

The command starts the serving stack (one worker) on the model, runs the client counts in turn, `--rounds`
times over (or the soak), and prints a table (notebooks 10 and 11 show the committed runs). `--step` also
times the batched decoding step alone (helpers.tools.bench's, as many sequences as the most clients) after each
round, in this process while the worker idles: the server's ceiling, measured side by side. It times it in the
main thread, in a thread that runs it every round (as the worker's model thread does) and in a new thread
started for it, the order rotated each round, to see what a step loses off the main thread.
"""
import argparse
import json
import statistics
from collections import Counter
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import psutil
import requests

from helpers.measure import provenance
from helpers.measure.client import STALLED_S, load_test
from helpers.measure.reports import serving_markdown, soak_table
from helpers.measure.results import SoakResult
from helpers.measure.workloads import QUESTIONS, batch_prompts
from helpers.runtime import startup
from helpers.runtime.settings import add_flags, from_flags
from helpers.runtime.errors import UserError, one_line_errors


SOAK_MEASURED_AFTER = 200  # the worker's memory is read after this many requests, and after the last
MALFORMED = [  # (body, what the answer's one line says): requests a soak sends that must be refused
    ('{"model": "MODEL", "prompt": ', "not valid JSON"),
    ({"prompt": " ", "max_tokens": 8}, "prompt is empty"),
    ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": 8, "presence_penalty": 9}, "presence_penalty"),
]


def _one_line_refusal(response, expected=""):
    try:
        message = response.json()["message"]
    except (ValueError, KeyError, TypeError):
        return False
    return 400 <= response.status_code < 500 and "\n" not in message and expected in message and (
        response.status_code != 429 or response.headers.get("Retry-After", "").isdigit())


def soak_request(url, model, index, headers=None):
    """(outcome, detail) of the soak's request number index: one in 20 is malformed, one in 10 is cancelled
    after its first event, the others are streamed or whole completions of 1 to 64 tokens, greedy or sampled.
    A client refused with 429 waits the Retry-After it was given before it sends its next request."""
    headers = {"Content-Type": "application/json", **(headers or {})}
    try:
        if index % 20 == 7:
            body, expected = MALFORMED[index // 20 % len(MALFORMED)]
            data = body.replace("MODEL", model) if isinstance(body, str) else json.dumps({"model": model, **body})
            response = requests.post(url + "/v1/completions", data=data, headers=headers, timeout=STALLED_S)
            lost = ("lost", f"HTTP {response.status_code}: {response.text[:200]}")
            return ("refused", "") if _one_line_refusal(response, expected) else lost
        body = {"model": model, "prompt": QUESTIONS[index % len(QUESTIONS)], "max_tokens": 1 + index * 37 % 64,
                "temperature": 0 if index % 3 else 0.8, "stream": index % 10 == 3 or index % 2 == 1}
        with requests.post(url + "/v1/completions", json=body, headers=headers, stream=body["stream"], timeout=STALLED_S) as response:
            if response.status_code != 200:
                ok = _one_line_refusal(response)
                lost = ("lost", f"HTTP {response.status_code}: {response.text[:200]}")
                if ok and response.status_code == 429:  # as the openai client does: wait until a place is free
                    time.sleep(int(response.headers["Retry-After"]))
                return ("refused", str(response.status_code)) if ok else lost
            if index % 10 == 3:
                next(response.iter_lines())
                return "cancelled", ""  # leaving the block closes the connection
            events = [json.loads(line[6:]) for line in response.iter_lines(decode_unicode=True)
                      if line.startswith("data: ") and line != "data: [DONE]"] if body["stream"] else [response.json()]
    except (requests.RequestException, ValueError, StopIteration) as error:
        return "lost", str(error)[:200]
    finished = [event for event in events if "choices" in event and event["choices"][0].get("finish_reason")]
    return ("answered", "") if finished and not any("error" in event for event in events) else ("lost", str(events[-1:])[:200])


def soak(url, model, count, clients, worker_rss_mb=lambda: None, headers=None):
    """Send `count` soak requests (soak_request), `clients` at a time; the worker's memory is read after the
    first SOAK_MEASURED_AFTER and after the last."""
    result, started, outcomes = SoakResult(count, clients), time.monotonic(), []
    with ThreadPoolExecutor(clients) as pool:
        for when, first, last in (("after_first", 0, min(count, SOAK_MEASURED_AFTER)),
                                  ("after_all", min(count, SOAK_MEASURED_AFTER), count)):
            outcomes += pool.map(lambda index: soak_request(url, model, index, headers), range(first, last))
            result.rss_mb[when] = worker_rss_mb()
    result.seconds = time.monotonic() - started
    result.outcomes = dict(Counter(outcome for outcome, _ in outcomes))
    result.refused_429 = sum(1 for outcome, detail in outcomes if outcome == "refused" and detail == "429")
    result.lost = [detail for outcome, detail in outcomes if outcome == "lost"][:5]
    return result


def step_tokens_per_s(model, batch, steps=16, executor=None):
    """Tokens/s of the batched decoding step alone: `batch` sequences (the benchmark's prompts), the median step;
    executor: a ThreadPoolExecutor of one thread to run it in, rather than the calling thread."""
    from helpers.measure.timing import batched_greedy

    if executor is not None:
        return executor.submit(step_tokens_per_s, model, batch, steps).result()
    _, step_ms = batched_greedy(model, batch_prompts(model.config.vocab_size, batch), steps)
    return batch * 1000 / statistics.median(step_ms)


def step_in_new_thread(model, batch):
    """step_tokens_per_s in a thread started for it, as a first call from a new thread would run."""
    with ThreadPoolExecutor(1) as executor:
        return step_tokens_per_s(model, batch, executor=executor)


def step_timers(model, batch, model_thread):
    """{JSON key: how to time the step}: in the main thread, in `model_thread` (one executor for the whole run,
    as the worker's model thread), in a new thread (the key the runs before wrote, when it was the only other)."""
    return {"step_tokens_per_s": lambda: step_tokens_per_s(model, batch),
            "step_in_long_lived_thread_tokens_per_s": lambda: step_tokens_per_s(model, batch, executor=model_thread),
            "step_in_thread_tokens_per_s": lambda: step_in_new_thread(model, batch)}


def in_turn(timers, round_index):
    """The timers in round `round_index`'s order: rotated one place a round, so that over as many rounds as
    there are timers each is timed first, second, ... once."""
    keys = list(timers)
    shift = round_index % len(keys)
    return [(key, timers[key]) for key in keys[shift:] + keys[:shift]]


@one_line_errors
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, "model")
    parser.add_argument("--clients", default="1,4,16", help="client counts (a soak: one count)")
    parser.add_argument("--requests", type=int, default=16, help="requests per client count and round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--step", action="store_true", help="time the batched step alone after each round")
    parser.add_argument("--soak", type=int, metavar="REQUESTS", help="a soak of this many requests instead")
    parser.add_argument("--max-batch", type=int, default=16, help="the worker's --max-batch")
    parser.add_argument("--max-queue", type=int, help="the worker's --max-queue (default: --max-batch)")
    parser.add_argument("--json", type=Path, help="write the run here")
    args = parser.parse_args(argv)
    startup.start(from_flags(args))
    from helpers.measure.serving_run import serving_run
    from helpers.runtime.loading import load_model

    try:
        clients = [int(count) for count in args.clients.split(",")]
    except ValueError:
        parser.error(f"--clients takes client counts separated by commas, e.g. 1,4,16 (got {args.clients!r})")
    if args.soak is not None and (len(clients) != 1 or args.soak < 1):
        parser.error("--soak takes a number of requests and one client count (--clients 16)")
    try:
        with serving_run(args.model, max_batch=args.max_batch, max_queue=args.max_queue) as serving:
            stack, model = serving.stack, serving.model
            if args.soak:
                worker = psutil.Process(stack.workers[0].popen.pid)
                result = soak(stack.url, model, args.soak, clients[0], lambda: worker.memory_info().rss / 2**20)
                result.worker = requests.post(stack.workers[0].url + "/worker_get_status", timeout=10).json()
            else:
                alone = load_model(serving.source, report=lambda line: None) if args.step else None
                results, steps = [], {}
                with ThreadPoolExecutor(1) as model_thread:
                    timers = step_timers(alone, max(clients), model_thread) if args.step else {}
                    for round_index in range(args.rounds):
                        results += [load_test(stack.url, model, count, args.requests, args.max_tokens,
                                              lambda text: len(serving.tokenizer(text).input_ids)) for count in clients]
                        if timers:
                            for key, measure in in_turn(timers, round_index):
                                steps.setdefault(key, []).append(measure())
    except UserError as error:
        sys.exit(f"Error: {error}")
    made = serving.stamp(provenance.command_line("helpers.tools.load_test", argv))
    if args.soak:
        run = {"model": model, "max_batch": args.max_batch, "max_queue": args.max_queue, "provenance": made,
               "soak": asdict(result)}
        print(soak_table(run, result))
        if result.lost:
            print("Lost:", *result.lost, sep="\n  ")
    else:
        run = {"model": model, "max_tokens": args.max_tokens, "requests": args.requests, "rounds": args.rounds,
               "provenance": made, "results": [asdict(result) for result in results], **steps}
        print(serving_markdown(run, results, targets=True))
    if args.json:
        args.json.write_text(json.dumps(run, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
