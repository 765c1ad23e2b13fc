"""How fast the World tokenizer encodes, next to rwkv's TRIE_TOKENIZER (the reference, `rwkv` package).

    python -m helpers.tools.tokenizer_speed [--tokens 4000] [--rounds 21] [--json data/bench/tokenizer-tempest.json]

Both encode the first --tokens tokens of the held-out play (data/heldout/tempest.txt) in alternating rounds,
ours as a worker calls it (`tokenizer(text).input_ids`, transformers' per-call work included) and its byte
matcher alone (encode_bytes); the ids must be the reference's. It prints each one's median and range and
its time against the reference's in the same round.
"""
import argparse
import json
import statistics
from pathlib import Path

from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
from tabulate import tabulate

from helpers.measure import provenance
from helpers.measure.timing import seconds
from helpers.runtime.errors import UserError, one_line_errors
from helpers.runtime.paths import DATA_DIR
from helpers.runtime.tokenization_rwkv_world import RWKVWorldTokenizer
from helpers.measure.checkpoints import vocabulary_file

TEXT = DATA_DIR / "heldout" / "tempest.txt"


def measure(tokens=4000, rounds=21):
    """{"tokens", "rounds": {name: [seconds of each round]}}; UserError where ours and the reference differ."""
    reference = TRIE_TOKENIZER(str(vocabulary_file()))
    ours = RWKVWorldTokenizer(str(vocabulary_file()))
    play = TEXT.read_text(encoding="utf-8")
    text = reference.decode(reference.encode(play[:tokens * 8])[:tokens])
    expected = reference.encode(text)
    ways = {"TRIE_TOKENIZER (rwkv 0.8.32)": lambda: reference.encode(text),
            "ours, tokenizer(text).input_ids": lambda: ours(text).input_ids,
            "ours, encode_bytes alone": lambda: ours.encode_bytes(text.encode("utf-8"))}
    for name, encode in ways.items():
        if encode() != expected:
            raise UserError(f"{name} gives other ids than the reference on the held-out play")
    times = {name: [] for name in ways}
    for _ in range(rounds):
        for name, encode in ways.items():
            times[name].append(seconds(encode))
    return {"tokens": len(expected), "rounds": times}


def table(result):
    reference = next(iter(result["rounds"].values()))
    rows = []
    for name, times in result["rounds"].items():
        ratios = [mine / theirs for mine, theirs in zip(times, reference)]
        rows.append([name, f"{statistics.median(times) * 1e3:.2f}", f"{min(times) * 1e3:.2f} to {max(times) * 1e3:.2f}",
                     f"{statistics.median(ratios):.2f}x ({min(ratios):.2f} to {max(ratios):.2f})"])
    return tabulate(rows, ["encoder", "ms (median)", "ms (range)", "against the reference, same round"], tablefmt="github")


@one_line_errors
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4000, help="tokens of the held-out play to encode")
    parser.add_argument("--rounds", type=int, default=21, help="alternating rounds")
    parser.add_argument("--json", type=Path, help="write the rounds here, with their provenance")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.rounds < 1:
        parser.error("--tokens and --rounds must be at least 1")
    result = measure(args.tokens, args.rounds)
    command = provenance.command_line("helpers.tools.tokenizer_speed", argv)
    result["provenance"] = provenance.stamp("tokenizer", command, 1, None)
    print(f"{result['tokens']} tokens of the held-out play, {args.rounds} alternating rounds. "
          f"{provenance.caption(result['provenance'])}")
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
