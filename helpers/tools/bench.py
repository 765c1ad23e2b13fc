"""Benchmark RWKV-4 on this CPU: HF fp32 / bf16 against bigdl-llm low-bit, side by side in one run.

    python -m helpers.tools.bench [--shape 1b5] [--layout hub] [--threads N] [--json PATH] [--plot PATH] [--options a,b]
                            [--batch 1,4,8,16] [--kernel auto,avx512,avxvnni,avx2]
    python -m helpers.tools.bench --refresh README.md docs/benchmarks.md docs/serving.md docs/quality.md data/bench/README.md  # tables

Each option runs in its own fresh process, one after another, on the same checkpoint and prompt, in the
offline checkpoint's safetensors layout or in the layout the hub ships (`--layout hub`: one
pytorch_model.bin).
Decode is memory-bound: each token reads every weight of the block linears and the head once, so
weight bytes / read bandwidth is the fastest a token can be (`bound_ms`). On a shared machine the
bandwidth drifts from second to second, so it is sampled between the decoded tokens (every
BANDWIDTH_EVERY tokens) and the bound uses the samples' median, like the decode time it is set
against. `best_bound_ms` uses the single best read instead (of those between the tokens and ten each
just before and after decoding): a stricter bound that no token, nor torch's own reads, reaches on a
busy host. For the fused step, `multiply_add_bound_ms` is the other floor: its integer multiply-adds alone,
at the rate this CPU runs them back to back (helpers.runtime.fused_decode's rwkv4_block_dots_per_second).
A token cannot be faster than the larger of the two.

`--kernel` runs each format that can use the fused step once per build named (helpers.runtime.fused_decode
KERNELS; auto: the fastest this CPU runs), so that a CPU with AVX-512 measures the builds of CPUs without it;
the other loaders of sym_int4 (`_from_pretrained`, `_cache`) run the first build named.
With RWKV_NATIVE_BUILD=avx2 set as well, the torch path (`sym_int4_unfused`) is that of a CPU without
AVX-512 too.

`--batch` adds batched decoding (what a server does): independent sequences, each with its own prompt
and state, advance one token per step with the weights read once for all of them. Each batch size runs
BATCH_STEPS steps in each of BATCH_ROUNDS rounds, the sizes taking turns; the table gives the median
step, its range over the rounds, the aggregate tokens/s, and whether every sequence got the greedy
tokens it gets decoded alone.

The prefill figure is the median of PREFILL_ROUNDS warm reads of the prompt; the first read, which also
touches the buffers and weights for the first time, is kept as `first_prefill_ms`.

`--json` writes the records with their provenance (helpers.measure.provenance: machine, date, threads, read bandwidth,
and a fingerprint of the kernel and loaders); a table is only rendered from a file of this code.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import psutil
from tqdm import tqdm

from helpers.measure import provenance
from helpers.measure.bandwidth import read_bandwidth_gbs
from helpers.measure.reports import batch_table, load_summary, markdown_table, plot, refresh, targets_table
from helpers.measure.workloads import (BATCH_ROUNDS, BATCH_STEPS, DECODE_TOKENS, FROM_PRETRAINED, UNFUSED, batch_prompts,
                                      prompt_ids)
from helpers.measure.worker_process import WorkerProcess
from helpers.runtime.errors import one_line_errors
from helpers.runtime.shapes import SHAPES
from helpers.measure.checkpoints import LAYOUTS
from helpers.runtime.fused_decode import KERNELS
from helpers.runtime.memory import GIB, huge_page_bytes, model_weight_bytes, peak_rss_bytes
from helpers.runtime import library, startup

OPTIONS = ["hf_fp32", "hf_bf16", "sym_int4", "sym_int4_unfused", "sym_int4_from_pretrained", "asym_int4", "sym_int5",
           "sym_int8", "sym_int4_head8", "sym_int4_cache"]
BANDWIDTH_EVERY = 8  # decoded tokens between two bandwidth samples
PREFILL_ROUNDS = 5  # the prompt read again after decoding, warm; the median is the prefill figure


def linear_weight_bytes(model):
    """Bytes of the weights every decoded token reads: all block linears and the head."""
    import torch

    LowBitLinear = library.low_bit_linear().LowBitLinear
    return sum(m.weight.data.nbytes for m in model.modules() if isinstance(m, (torch.nn.Linear, LowBitLinear)))


def multiply_add_bound_ms(model, threads):
    """The fused step's integer multiply-adds for one token, with nothing else, at the rate this CPU computes them
    back to back (rwkv4_block_dots_per_second, the median of 3): every weight block once, each in its format.
    Without VNNI they take about twice the instructions, and on few cores they can outlast the read."""
    from helpers.runtime.fused_decode import BLOCK_BYTES

    fused = model.fused_forward
    head_bytes = model.head.weight.data.nbytes
    blocks = {fused.model.format: (linear_weight_bytes(model) - head_bytes) / BLOCK_BYTES[fused.model.format]}
    blocks[fused.model.head_format] = blocks.get(fused.model.head_format, 0) + head_bytes / BLOCK_BYTES[fused.model.head_format]
    rate = {f: statistics.median(fused.native.rwkv4_block_dots_per_second(f, threads) for _ in range(3)) for f in blocks}
    return sum(count / rate[f] for f, count in blocks.items()) * 1000


def load_option(option, source):
    import torch

    from helpers.runtime.loading import load_cached_low_bit_model, load_hf_model, load_low_bit_model

    if option == "hf_fp32":
        return load_hf_model(source, torch.float32)
    if option == "hf_bf16":
        return load_hf_model(source, torch.bfloat16)
    if option.endswith("_cache"):
        return load_cached_low_bit_model(source, option.removesuffix("_cache"))
    if option.endswith(FROM_PRETRAINED):
        return load_low_bit_model(source, option.removesuffix(FROM_PRETRAINED), loader="from_pretrained")
    return load_low_bit_model(source, option.removesuffix(UNFUSED))


def measure_batched(model, vocab_size, batches, bound_ms):
    from helpers.measure.timing import measure_batches

    measured = measure_batches(model, batch_prompts(vocab_size, max(batches)), batches, BATCH_STEPS, BATCH_ROUNDS)
    return [{"batch": m.batch, "step_ms": statistics.median(m.step_ms), "step_ms_range": [min(m.step_ms), max(m.step_ms)],
             "aggregate_tokens_per_s": m.aggregate_tokens_per_s, "step_over_bound": statistics.median(m.step_ms) / bound_ms,
             "same_tokens_as_alone": m.same_as_alone} for m in measured.values()]


def checkpoint_source(shape, layout, threads):
    """What a measuring process does first: start up (bigdl-llm's native library for this CPU), give torch
    `threads` threads, and resolve the checkpoint of the shape and layout, built first where missing."""
    import torch

    startup.start()
    from helpers.measure.checkpoints import ensure_checkpoint
    from helpers.runtime.models import resolve_model

    torch.set_num_threads(threads)
    return resolve_model(str(ensure_checkpoint(shape, layout=layout)))


def measure(option, shape, threads, layout="safetensors", batches=()):
    """One option, in this process: a dict of the numbers the table shows."""
    source = checkpoint_source(shape, layout, threads)
    from helpers.measure.timing import timed_greedy_decode, warm_prefill_ms
    from helpers.runtime.fused_decode import kernel_name
    from helpers.runtime.low_bit_cache import cache_dir, cache_problem

    if option.endswith("_cache") and cache_problem(source, cache_dir(source, option.removesuffix("_cache"))):
        load_option(option, source)  # write the cache in a run of its own; time the second load
        return None
    start = time.perf_counter()
    model = load_option(option, source)
    load_s = time.perf_counter() - start
    peak_load = peak_rss_bytes()  # the process's peak so far: the load
    best_before = read_bandwidth_gbs(threads)
    samples = []

    def sample_bandwidth(step):
        if step % BANDWIDTH_EVERY == 0:
            samples.append(read_bandwidth_gbs(threads, repeats=1))

    run = timed_greedy_decode(model, prompt_ids(source.config["vocab_size"]), DECODE_TOKENS, sample_bandwidth)
    best_bandwidth = max(best_before, read_bandwidth_gbs(threads), *samples)
    bandwidth = statistics.median(samples)
    weight_bytes = linear_weight_bytes(model)
    bound_ms = weight_bytes / (bandwidth * 1e9) * 1000
    batched = measure_batched(model, source.config["vocab_size"], batches, bound_ms) if batches else []
    return {
        "option": option,
        "load_s": load_s,
        "peak_load_rss_gib": peak_load / GIB,
        "steady_rss_gib": statistics.median(run.rss_bytes) / GIB,
        "huge_pages_gib": huge_page_bytes() / GIB,
        "prefill_ms": warm_prefill_ms(model, prompt_ids(source.config["vocab_size"]), PREFILL_ROUNDS),
        "first_prefill_ms": run.prefill_ms,
        "decode_ms": statistics.median(run.latency_ms),
        "weight_bytes": weight_bytes,
        "bandwidth_gbs": bandwidth,
        "bound_ms": bound_ms,
        "best_bandwidth_gbs": best_bandwidth,
        "best_bound_ms": weight_bytes / (best_bandwidth * 1e9) * 1000,
        "multiply_add_bound_ms": multiply_add_bound_ms(model, threads) if getattr(model, "fused_forward", None) else None,
        "model_bytes": model_weight_bytes(model),
        "tokens": run.tokens,
        "fused_decode": getattr(model, "fused_forward", None) is not None,
        "kernel": kernel_name(model.fused_forward.native) if getattr(model, "fused_forward", None) else None,
        "batches": batched,
    }


def run_worker(option, shape, threads, layout="safetensors", batches=(), kernel="auto"):
    """Measure one option in a fresh process (with the fused build `kernel`); None when that run only
    wrote the low-bit cache."""
    args = ["--worker", option, "--shape", shape, "--threads", str(threads), "--layout", layout,
            "--batch", ",".join(map(str, batches))]
    env = {"RWKV_FUSED_DECODE": "0"} if option.endswith(UNFUSED) else {"RWKV_FUSED_KERNEL": kernel} if kernel != "auto" else {}
    with WorkerProcess("helpers.tools.bench", args, threads, env) as worker:
        return worker.read()["record"]


def builds_to_run(option, kernels):
    """The fused builds an option runs: each one named for a format the fused step reads, the first one for
    the other loaders of sym_int4, none (auto) for the torch path."""
    if option.startswith("hf_") or option.endswith(UNFUSED):
        return ["auto"]
    return kernels[:1] if option.endswith((FROM_PRETRAINED, "_cache")) else kernels


def run_benchmark(shape="1b5", threads=None, options=OPTIONS, layout="safetensors", batches=(), kernels=("auto",),
                  command="python -m helpers.tools.bench"):
    from helpers.measure.checkpoints import ensure_checkpoint

    threads = threads or psutil.cpu_count(logical=False) or 1
    ensure_checkpoint(shape, layout=layout)  # here, so that building it counts in no worker's peak memory
    runs = [(option, kernel) for option in options for kernel in builds_to_run(option, list(kernels))]
    records = []
    with tqdm(total=len(runs), desc=f"bench {shape} ({layout}), {threads} threads", unit="run") as progress:
        for option, kernel in runs:
            progress.set_postfix_str(f"{option} ({kernel})")
            sizes = () if option.startswith("hf_") else batches  # batched steps are the low-bit runtime's
            record = run_worker(option, shape, threads, layout, sizes, kernel)
            if record is None:  # the cache was just written: measure loading it
                record = run_worker(option, shape, threads, layout, sizes, kernel)
            records.append(record)
            progress.update()
    reference = next((r["tokens"] for r in records if r["option"] == "hf_fp32"), records[0]["tokens"])
    for record in records:
        record["same_tokens"] = sum(a == b for a, b in zip(record["tokens"], reference)) / len(reference)
        record.update(shape=shape, layout=layout, threads=threads)
    made = provenance.stamp("decoding", command, threads, [r["bandwidth_gbs"] for r in records])
    return {"shape": shape, "layout": layout, "threads": threads, "records": records, "provenance": made}


@one_line_errors
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1b5", choices=list(SHAPES))
    parser.add_argument("--layout", default="safetensors", choices=list(LAYOUTS),
                        help="the checkpoint's layout: safetensors, or hub (pytorch_model.bin, as the hub ships it)")
    parser.add_argument("--threads", type=int, default=None, help="default: physical cores")
    parser.add_argument("--options", default=",".join(OPTIONS), help="comma-separated subset of " + ",".join(OPTIONS))
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--plot", type=Path, help="write a PNG plot here")
    parser.add_argument("--kernel", default="auto", help="fused step builds to run, comma-separated: auto, "
                        "avx512, avxvnni, avx2 (each option that uses the fused step runs once per build)")
    parser.add_argument("--batch", default="", help="batch sizes for batched decoding rows, e.g. 1,4,8,16")
    parser.add_argument("--refresh", nargs="+", type=Path, metavar="MARKDOWN",
                        help="rewrite the rendered tables of these markdown files from the committed runs, then stop")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.refresh:
        try:
            for path in args.refresh:
                refresh(path)
        except (provenance.StaleResults, FileNotFoundError) as error:
            parser.exit(1, f"Error: {error}\n")
        return 0
    unknown = set(args.options.split(",")) - set(OPTIONS)
    if unknown:
        parser.error(f"unknown options {', '.join(sorted(unknown))}; choose from {', '.join(OPTIONS)}")
    try:
        batches = sorted({int(size) for size in args.batch.split(",") if size.strip()})
    except ValueError:
        parser.error(f"--batch takes batch sizes separated by commas, e.g. 1,4,8,16 (got {args.batch!r})")
    if any(size < 1 or size > 64 for size in batches):
        parser.error("batch sizes go from 1 to 64")
    kernels = args.kernel.split(",")
    unknown_kernels = set(kernels) - {"auto", *KERNELS}
    if unknown_kernels:
        parser.error(f"unknown kernel {', '.join(sorted(unknown_kernels))}; choose from auto, {', '.join(KERNELS)}")
    if args.worker:
        print(json.dumps({"record": measure(args.worker, args.shape, args.threads, args.layout, batches)}))
        return 0
    command = provenance.command_line("helpers.tools.bench", argv)
    result = run_benchmark(args.shape, args.threads, args.options.split(","), args.layout, batches, kernels, command)
    print(markdown_table(result))
    print()
    if batches:
        print(batch_table(result))
        print()
    targets = targets_table(result)
    if targets:
        print(targets)
        print()
    print(load_summary(result))
    if args.json:
        args.json.write_text(json.dumps({"provenance": result["provenance"], "records": result["records"]}, indent=1))
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
