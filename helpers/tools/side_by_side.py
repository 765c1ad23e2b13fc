"""Two or more ways of loading or storing a model, timed side by side: one process each, loaded one after
another, then rounds in which each decodes in turn (the order reversed every other round), so that a ratio
compares runs a few seconds apart.

    python -m helpers.tools.side_by_side [--shape 7b] [--layout hub] [--options sym_int4,sym_int4_head8] [--rounds 24]
                                         [--threads N] [--json PATH]
    python -m helpers.tools.side_by_side --options sym_int4,sym_int4@ipex-llm,sym_int4_unfused,sym_int4_unfused@ipex-llm

On a shared machine the read bandwidth drifts by 2x from minute to minute: options measured one after
another (helpers.tools.bench) can differ by the drift alone. Here every round gives each option's median
decode time over ROUND_TOKENS greedy tokens and its ratio to the first option's in the same round; the table
gives each ratio's median and range over the rounds, with the bandwidth read between rounds. The options are
helpers.tools.bench's (sym_int4_cache: from the low-bit cache, made first where it is missing); OPTION@LIBRARY
runs it on that low-bit library (bigdl-llm or ipex-llm), in the environment `make install LIBRARY=...` made
where this one lacks it.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import psutil

from helpers.measure import provenance
from helpers.measure.bandwidth import read_bandwidth_gbs
from helpers.measure.reports import rounds_table
from helpers.measure.workloads import UNFUSED, prompt_ids
from helpers.measure.worker_process import WorkerProcess
from helpers.runtime.checkpoint_files import checkpoint_files
from helpers.runtime import library
from helpers.runtime.errors import UserError, one_line_errors
from helpers.runtime.formats import CHOICES
from helpers.runtime.memory import GIB, huge_page_bytes, model_weight_bytes, peak_rss_bytes, rss_bytes
from helpers.runtime.shapes import SHAPES
from helpers.tools.bench import OPTIONS, checkpoint_source, linear_weight_bytes, load_option
from helpers.measure.checkpoints import LAYOUTS
from helpers.runtime.paths import REPO_ROOT
from helpers.runtime.versions import ENVIRONMENTS

KNOWN = list(dict.fromkeys(OPTIONS + list(CHOICES)))  # the benchmark's options, every format and mix among them
ROUND_TOKENS = 8  # greedy tokens each option decodes in a round: a few seconds, so that rounds follow the drift


def worker(option, shape, threads, layout):
    """Load the option, then answer each line read with one round's decode timing."""
    source = checkpoint_source(shape, layout, threads)
    from helpers.measure.timing import timed_greedy_decode

    start = time.perf_counter()
    model = load_option(option.partition("@")[0], source)
    loaded = {"option": option, "library": library.described(), "load_s": time.perf_counter() - start,
              "peak_load_rss_gib": peak_rss_bytes() / GIB, "weight_bytes": linear_weight_bytes(model),
              "model_bytes": model_weight_bytes(model),
              "fused_decode": getattr(model, "fused_forward", None) is not None}
    prompt = prompt_ids(source.config["vocab_size"])
    timed_greedy_decode(model, prompt, ROUND_TOKENS)  # warm up: every round measures a warm process
    print(json.dumps({**loaded, "steady_rss_gib": rss_bytes() / GIB, "huge_pages_gib": huge_page_bytes() / GIB}), flush=True)
    for _ in sys.stdin:
        run = timed_greedy_decode(model, prompt, ROUND_TOKENS)
        print(json.dumps({"decode_ms": statistics.median(run.latency_ms), "prefill_ms": run.prefill_ms,
                          "tokens": run.tokens}), flush=True)


def interpreter(library_name):
    """The Python that runs an option on `library_name` (None: the one in use): this one where the library is
    installed here, else the one of the environment `make install LIBRARY=...` made for it."""
    if not library_name or library_name in library.installed():
        return sys.executable
    python = REPO_ROOT / ENVIRONMENTS[library_name] / "bin" / "python"
    if not python.exists():
        raise UserError(f"{library_name} is not installed here, and {python.parent.parent.name} is missing: run "
                        f"`make install LIBRARY={library_name}` first")
    return python


def run_side_by_side(shape, layout, options, rounds, threads, command):
    from helpers.measure.checkpoints import ensure_checkpoint

    folder = ensure_checkpoint(shape, layout=layout)
    processes, records = {}, []
    try:
        for option in options:  # one at a time: no load competes with another for memory or bandwidth
            _drop_from_page_cache(checkpoint_files(folder))
            base, _, library_name = option.partition("@")
            env = {"RWKV_FUSED_DECODE": "0"} if base.endswith(UNFUSED) else {}
            env.update({"RWKV_LIBRARY": library_name} if library_name else {})
            args = ["--worker", option, "--shape", shape, "--threads", str(threads), "--layout", layout]
            processes[option] = WorkerProcess("helpers.tools.side_by_side", args, threads, env,
                                              python=interpreter(library_name))
            records.append(processes[option].read())
        timings, bandwidths = [], []
        for number in range(rounds):
            bandwidths.append(read_bandwidth_gbs(threads, repeats=1))
            # each option in each place of a round as often, so that what a place costs falls on all alike
            turns = list(processes.items())[::1 if number % 2 == 0 else -1]
            timings.append({option: process.ask() for option, process in turns})
    finally:
        for process in processes.values():
            process.close()
    for record in records:
        option = record["option"]
        record["decode_ms"] = [round_[option]["decode_ms"] for round_ in timings]
        record["prefill_ms"] = [round_[option]["prefill_ms"] for round_ in timings]
        record["same_tokens"] = timings[-1][option]["tokens"] == timings[-1][options[0]]["tokens"]
    made = provenance.stamp("decoding", command, threads, bandwidths)
    return {"shape": shape, "layout": layout, "threads": threads, "round_tokens": ROUND_TOKENS, "records": records,
            "provenance": made}


def _drop_from_page_cache(paths):
    """Let the page cache drop these files: the checkpoint one load read would otherwise fill the memory that
    the next process's weights need as huge pages (on the 7B here: 3.5, 2.2 and 1.2 GiB of their 3.6 GiB for
    the first, second and third process loaded), and options would be compared on unequal pages."""
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


@one_line_errors
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1b5", choices=list(SHAPES))
    parser.add_argument("--layout", default="safetensors", choices=list(LAYOUTS))
    parser.add_argument("--options", default="sym_int4,sym_int4_head8",
                        help="comma-separated, two or more of " + ",".join(KNOWN) + ", each OPTION or OPTION@LIBRARY "
                        f"({' or '.join(library.PACKAGES)}); ratios are to the first")
    parser.add_argument("--rounds", type=int, default=24, help="rounds of decoding, the options taking turns")
    parser.add_argument("--threads", type=int, default=None, help="default: physical cores")
    parser.add_argument("--json", type=Path, help="write the run here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threads = args.threads or psutil.cpu_count(logical=False) or 1
    options = args.options.split(",")
    unknown = {option.partition("@")[0] for option in options} - set(KNOWN)
    unknown |= {option for option in options if option.partition("@")[2] not in ("", *library.PACKAGES)}
    if unknown or len(set(options)) < 2:
        parser.error(f"--options takes two or more different options of {', '.join(KNOWN)}")
    if not 1 <= args.rounds <= 100:
        parser.error("--rounds goes from 1 to 100")
    if args.worker:
        worker(args.worker, args.shape, threads, args.layout)
        return 0
    command = provenance.command_line("helpers.tools.side_by_side", argv)
    result = run_side_by_side(args.shape, args.layout, options, args.rounds, threads, command)
    print(rounds_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
