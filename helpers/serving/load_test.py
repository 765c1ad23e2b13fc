"""A load test of an OpenAI-compatible server on this machine: a fixed number of streamed greedy
completions, a fixed number of clients at a time; it stops by itself.

    python -m helpers.serving.load_test [--model PATH_OR_ID] [--clients 1,4,16] [--requests 16] [--max-tokens 64]
                                        [--rounds 3] [--json data/bench/serving-NAME.json]

The command starts the serving stack (one worker) on the model, runs the client counts in turn, `--rounds`
times over, and prints a table (the notebook 07 shows the committed runs).
"""
import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import requests

from helpers import provenance
from helpers.runtime.errors import UserError
from helpers.runtime.paths import DATA_DIR

LOAD_HEADERS = ["clients", "answered", "tokens/s", "first token p50 (ms)", "p95", "last token p50 (ms)", "p95"]
STALLED_S = 300  # a stream silent this long counts as an error
PROMPTS = [f"Question: {question}\n\nAnswer:" for question in
           ("What is AI?", "Why is the sky blue?", "What is a CPU?", "How do trains work?")]


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
    """The value at `share` (0.5: the median) of the sorted values; NaN for none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))] if ordered else float("nan")


def _stream(url, body):
    """(text, ms to the first text or None, ms to the end, error or None) of one streamed completion."""
    started, text, first_ms, finished = time.monotonic(), "", None, False
    try:
        with requests.post(url, json=body, stream=True, timeout=STALLED_S) as response:
            if response.status_code != 200:
                return text, None, None, f"HTTP {response.status_code}: {response.text}"
            for line in response.iter_lines(decode_unicode=True):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error_code" in event:
                    return text, None, None, event["text"]
                choice = event["choices"][0]
                if choice["text"] and first_ms is None:
                    first_ms = (time.monotonic() - started) * 1000
                text += choice["text"]
                finished = finished or choice["finish_reason"] is not None
    except requests.RequestException as error:
        return text, None, None, str(error)
    if not finished:
        return text, None, None, "the stream ended without a finish_reason"
    return text, first_ms, (time.monotonic() - started) * 1000, None


def load_test(url, model, clients, requests_count, max_tokens, count_tokens, prompts=PROMPTS, time_limit_s=120):
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


def by_clients(results):
    """{clients: [the LoadResult of each round]}, in order of clients."""
    return {clients: [r for r in results if r.clients == clients] for clients in sorted({r.clients for r in results})}


def latencies_ms(rounds, until):
    """Milliseconds from sending to the "first" or the "last" token, of every complete answer of the rounds."""
    return [ms for result in rounds for ms in getattr(result, f"{until}_ms")]


def load_rows(results):
    """Table rows (LOAD_HEADERS), one per client count; with several rounds of a count, tokens/s is the
    median with its range and the latencies are over all rounds' answers."""
    rows = []
    for clients, rounds in by_clients(results).items():
        speeds = [result.tokens_per_s for result in rounds]
        speed = f"{statistics.median(speeds):.0f}" + (f" ({min(speeds):.0f} to {max(speeds):.0f})" if len(rounds) > 1 else "")
        first, last = latencies_ms(rounds, "first"), latencies_ms(rounds, "last")
        rows.append([clients, f"{sum(r.answered for r in rounds)}/{sum(r.sent for r in rounds)}", speed,
                     f"{percentile(first, 0.5):.0f}", f"{percentile(first, 0.95):.0f}",
                     f"{percentile(last, 0.5):.0f}", f"{percentile(last, 0.95):.0f}"])
    return rows


def load_run(name):
    """A committed run, data/bench/NAME.json: (its settings, [LoadResult]); StaleResults when it was measured
    with other kernel, loader or serving code than this checkout's."""
    path = DATA_DIR / "bench" / f"{name}.json"
    run = json.loads(path.read_text())
    provenance.check_current(run["provenance"], path.relative_to(DATA_DIR.parent))
    return {key: value for key, value in run.items() if key != "results"}, [LoadResult(**r) for r in run["results"]]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder or hub id (default: RWKV_MODEL, else the model trained here)")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=16, help="requests per client count and round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the run here")
    args = parser.parse_args(argv)
    from helpers.bench import read_bandwidth_gbs
    from helpers.models import resolve_model
    from helpers.runtime.loading import load_tokenizer
    from helpers.serving.stack import Stack

    try:
        clients = [int(count) for count in args.clients.split(",")]
    except ValueError:
        parser.error(f"--clients takes client counts separated by commas, e.g. 1,4,16 (got {args.clients!r})")
    try:
        source = resolve_model(args.model)
        tokenizer = load_tokenizer(source)
        threads = psutil.cpu_count(logical=False) or 1
        bandwidths = [read_bandwidth_gbs(threads)]
        with Stack(model=source.location) as stack:
            model = requests.get(stack.url + "/v1/models", timeout=10).json()["data"][0]["id"]
            results = [load_test(stack.url, model, count, args.requests, args.max_tokens,
                                 lambda text: len(tokenizer(text).input_ids))
                       for _ in range(args.rounds) for count in clients]
        bandwidths.append(read_bandwidth_gbs(threads))
    except UserError as error:
        sys.exit(f"Error: {error}")
    command = " ".join(["python -m helpers.serving.load_test", *(argv if argv is not None else sys.argv[1:])])
    made = provenance.stamp("serving", command, threads, bandwidths)
    run = {"model": model, "max_tokens": args.max_tokens, "requests": args.requests, "rounds": args.rounds,
           "provenance": made, "results": [asdict(result) for result in results]}
    from tabulate import tabulate

    print(f"{model}: {args.requests} requests of {args.max_tokens} tokens per count, {args.rounds} rounds. "
          + provenance.caption(made))
    print(tabulate(load_rows(results), LOAD_HEADERS, tablefmt="github", disable_numparse=True))
    if args.json:
        args.json.write_text(json.dumps(run, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
