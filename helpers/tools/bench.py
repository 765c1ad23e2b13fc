"""Benchmark RWKV-4 on this CPU: HF fp32 / bf16 against bigdl-llm low-bit, side by side in one run.

    python -m helpers.tools.bench [--shape 1b5] [--layout hub] [--threads N] [--json PATH] [--plot PATH] [--options a,b]
                            [--batch 1,4,8,16] [--kernel auto,avx512,avxvnni,avx2]
    python -m helpers.tools.bench --refresh README.md data/bench/README.md    # their tables, from the committed runs

Each option runs in its own fresh process, one after another, on the same checkpoint and prompt, in the
offline checkpoint's safetensors layout or in the layout the hub ships (`--layout hub`: one
pytorch_model.bin).
Decode is memory-bound: each token reads every weight of the block linears and the head once, so
weight bytes / read bandwidth is the fastest a token can be (`bound_ms`). On a shared machine the
bandwidth drifts from second to second, so it is sampled between the decoded tokens (every
BANDWIDTH_EVERY tokens) and the bound uses the samples' median, like the decode time it is set
against. `best_bound_ms` uses the single best read instead (of those between the tokens and ten each
just before and after decoding): a stricter bound that no token, nor torch's own reads, reaches on a
busy host.

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

`--json` writes the records with their provenance (helpers.measure.provenance: machine, date, threads, read bandwidth,
and a fingerprint of the kernel and loaders); a table is only rendered from a file of this code.
"""
import argparse
import json
import re
import resource
import statistics
import sys
import time
from pathlib import Path

import psutil
from tqdm import tqdm

from helpers.measure import provenance
from helpers.measure.bandwidth import read_bandwidth_gbs
from helpers.measure.results import read_run
from helpers.measure.workloads import PROMPT_TOKENS, batch_prompts, prompt_ids
from helpers.measure.worker_process import WorkerProcess
from helpers.runtime.errors import one_line_errors
from helpers.runtime.shapes import SHAPES
from helpers.measure.checkpoints import LAYOUTS
from helpers.runtime.fused_decode import KERNELS
from helpers.runtime.memory import GIB, model_weight_bytes
from helpers.runtime import startup

OPTIONS = ["hf_fp32", "hf_bf16", "sym_int4", "sym_int4_unfused", "sym_int4_from_pretrained", "asym_int4", "sym_int5",
           "sym_int8", "sym_int4_cache"]
UNFUSED = "_unfused"  # sym_int4 decoded through torch and bigdl's kernels, without helpers.runtime.fused_decode
FROM_PRETRAINED = "_from_pretrained"  # loaded by bigdl-llm's from_pretrained instead of tensor by tensor
DECODE_TOKENS = 64
BANDWIDTH_EVERY = 8  # decoded tokens between two bandwidth samples
BATCH_STEPS, BATCH_ROUNDS = 16, 3


def linear_weight_bytes(model):
    """Bytes of the weights every decoded token reads: all block linears and the head."""
    import torch
    from bigdl.llm.transformers.low_bit_linear import LowBitLinear

    return sum(m.weight.data.nbytes for m in model.modules() if isinstance(m, (torch.nn.Linear, LowBitLinear)))


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


def measure(option, shape, threads, layout="safetensors", batches=()):
    """One option, in this process: a dict of the numbers the table shows."""
    import torch

    startup.start()
    from helpers.measure.timing import timed_greedy_decode
    from helpers.runtime.fused_decode import kernel_name
    from helpers.runtime.low_bit_cache import cache_dir, cache_problem
    from helpers.runtime.models import resolve_model
    from helpers.measure.checkpoints import ensure_checkpoint

    torch.set_num_threads(threads)
    source = resolve_model(str(ensure_checkpoint(shape, layout=layout)))

    if option.endswith("_cache") and cache_problem(source, cache_dir(source, option.removesuffix("_cache"))):
        load_option(option, source)  # write the cache in a run of its own; time the second load
        return None
    start = time.perf_counter()
    model = load_option(option, source)
    load_s = time.perf_counter() - start
    peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak so far: the load
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
        "prefill_ms": run.prefill_ms,
        "decode_ms": statistics.median(run.latency_ms),
        "weight_bytes": weight_bytes,
        "bandwidth_gbs": bandwidth,
        "bound_ms": bound_ms,
        "best_bandwidth_gbs": best_bandwidth,
        "best_bound_ms": weight_bytes / (best_bandwidth * 1e9) * 1000,
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


def load_run(name):
    """The committed run data/bench/NAME.json, as run_benchmark returns it; StaleResults when it was measured
    with other kernel or loader code than this checkout's."""
    run = read_run(name)
    first = run["records"][0]
    return {"shape": first["shape"], "layout": first["layout"], "threads": first["threads"], "records": run["records"],
            "provenance": run["provenance"]}


def load_summary(result):
    """How far each low-bit load peaked above the model it loaded, and how long it took."""
    lines = [f"{label(r)}: load peak {r['peak_load_rss_gib']:.2f} GiB, {r['peak_load_rss_gib'] - r['steady_rss_gib']:+.2f} "
             f"GiB above the loaded model ({r['steady_rss_gib']:.2f} GiB), {r['load_s']:.2f} s"
             for r in result["records"] if not r["option"].startswith("hf_")]
    return "\n".join(lines)


def label(record):
    """The option, and the fused step's build where it ran one."""
    return f"{record['option']} ({record['kernel']})" if record.get("kernel") else record["option"]


def markdown_table(result):
    fp32 = next((r for r in result["records"] if r["option"] == "hf_fp32"), None)
    lines = [
        f"Shape {result['shape']} ({result['layout']} layout), {PROMPT_TOKENS}-token prompt, median of {DECODE_TOKENS} greedy "
        f"tokens; the read bandwidth is each option's median between its tokens, the best read "
        f"{max(r['best_bandwidth_gbs'] for r in result['records']):.1f} GB/s. " + provenance.caption(result["provenance"]),
        "",
        "| option | load s | peak load RSS GiB | steady RSS GiB | weights in RAM GiB | prefill ms | decode ms/token | tokens/s "
        "| weight GiB read/token | bound ms | decode / bound | decode / best-read bound | decode / fp32 | tokens = fp32's |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["records"]:
        ratio = f"{r['decode_ms'] / fp32['decode_ms']:.3f}" if fp32 else "-"
        lines.append(
            f"| {label(r)} | {r['load_s']:.2f} | {r['peak_load_rss_gib']:.2f} | {r['steady_rss_gib']:.2f} "
            f"| {r['model_bytes'] / GIB:.2f} "
            f"| {r['prefill_ms']:.0f} | {r['decode_ms']:.1f} | {1000 / r['decode_ms']:.1f} "
            f"| {r['weight_bytes'] / GIB:.2f} | {r['bound_ms']:.1f} | {r['decode_ms'] / r['bound_ms']:.2f} "
            f"| {r['decode_ms'] / r['best_bound_ms']:.2f} | {ratio} | {r['same_tokens']:.0%} |"
        )
    return "\n".join(lines)


def by_batch(record):
    """A record's batched rows, {batch size: row}."""
    return {row["batch"]: row for row in record.get("batches", [])}


def batch_gain(record, batch):
    """How many times batch 1's tokens/s `batch` sequences got together, or None without both rows."""
    sizes = by_batch(record)
    if 1 in sizes and batch in sizes:
        return sizes[batch]["aggregate_tokens_per_s"] / sizes[1]["aggregate_tokens_per_s"]
    return None


def batch_table(result):
    """The batched decoding rows, or "" when the run had none."""
    rows = [(r, b) for r in result["records"] for b in r.get("batches", [])]
    if not rows:
        return ""
    lines = [f"Batched decoding, shape {result['shape']}: {BATCH_STEPS} steps of one token per sequence, median step "
             f"and its range over {BATCH_ROUNDS} rounds; the bound is one read of the weights per step (the option's "
             f"bandwidth in the decoding table). " + provenance.caption(result["provenance"]),
             "", "| option | batch | step ms | range ms | aggregate tokens/s | x batch 1 | step / bound "
             "| sequences with their tokens alone |", "|---|---|---|---|---|---|---|---|"]
    for record, b in rows:
        gain = batch_gain(record, b["batch"])
        speedup = f"{gain:.2f}" if gain is not None else "-"
        low, high = b["step_ms_range"]
        lines.append(f"| {label(record)} | {b['batch']} | {b['step_ms']:.1f} | {low:.1f} to {high:.1f} "
                     f"| {b['aggregate_tokens_per_s']:.1f} | {speedup} | {b['step_over_bound']:.2f} "
                     f"| {b['same_tokens_as_alone']:.0%} |")
    return "\n".join(lines)


def fused_summary(result):
    """One line per build of the fused step that ran sym_int4: its decode and prompt times against the torch path's."""
    unfused = next((r for r in result["records"] if r["option"] == "sym_int4" + UNFUSED), None)
    if unfused is None:
        return ""
    return "\n".join(
        f"sym_int4, {r['kernel']} build: {r['decode_ms']:.1f} ms a token against {unfused['decode_ms']:.1f} through torch "
        f"({unfused['decode_ms'] / r['decode_ms']:.2f}x faster); a {PROMPT_TOKENS}-token prompt in {r['prefill_ms']:.0f} ms "
        f"against {unfused['prefill_ms']:.0f} ({unfused['prefill_ms'] / r['prefill_ms']:.2f}x)"
        for r in result["records"] if r["option"] == "sym_int4" and r.get("kernel"))


def batch_summary(result, batch=8):
    """One line per option with batched rows: `batch` sequences' tokens/s and time per token against one's."""
    lines = []
    for record in result["records"]:
        gain, sizes = batch_gain(record, batch), by_batch(record)
        if gain is not None:
            lines.append(f"{label(record)}: {batch} sequences together get {gain:.2f}x the tokens/s of one, each "
                         f"token {sizes[batch]['step_ms'] / sizes[1]['step_ms']:.2f}x later")
    return "\n".join(lines)


def targets_table(result):
    """The decoding targets (issue 13), each with this run's figure, for the rows the run has."""
    records = result["records"]

    def find(option, kernel=None):
        return next((r for r in records if r["option"] == option and kernel in (None, r.get("kernel"))), None)

    rows = []
    avx2, unfused = find("sym_int4", "avx2"), find("sym_int4_unfused")
    if avx2:  # each figure is judged as the table prints it, to two decimals
        ratio = round(avx2["decode_ms"] / avx2["bound_ms"], 2)
        rows.append(("sym_int4 decode, avx2 build: at most 1.3x its bound", f"{ratio:.2f}x", ratio <= 1.3))
    if avx2 and unfused:
        ratio = round(avx2["prefill_ms"] / unfused["prefill_ms"], 2)
        rows.append((f"sym_int4 prefill ({PROMPT_TOKENS} tokens), avx2 build: at most half the torch path's",
                     f"{avx2['prefill_ms']:.0f} / {unfused['prefill_ms']:.0f} ms = {ratio:.2f}", ratio <= 0.5))
    for option in ("asym_int4", "sym_int5", "sym_int8"):
        for record in (r for r in records if r["option"] == option and r.get("kernel")):
            ratio = round(record["decode_ms"] / record["bound_ms"], 2)
            rows.append((f"{label(record)} decode: at most 1.25x its bound", f"{ratio:.2f}x", ratio <= 1.25))
    for record in (r for r in records if r.get("kernel")):  # the fused step's targets: not the torch path's
        if batch_gain(record, 8) is not None:
            speedup = round(batch_gain(record, 8), 2)
            same = by_batch(record)[8]["same_tokens_as_alone"]
            rows.append((f"{label(record)}, batch 8: at least 3.5x batch 1's tokens/s, each sequence's tokens as alone",
                         f"{speedup:.2f}x, {same:.0%} of sequences", speedup >= 3.5 and same == 1.0))
    if not rows:
        return ""
    lines = ["| target | this run | met |", "|---|---|---|"]
    lines += [f"| {target} | {figure} | {'yes' if met else 'no'} |" for target, figure, met in rows]
    return "\n".join(lines)


def summary_table(result):
    """The README's table: per option and build, prefill, decode and its bound, and batch 8 against batch 1."""
    lines = [provenance.caption(result["provenance"]) + f" Shape {result['shape']}, {result['layout']} layout.", "",
             f"| option (build) | prefill ms ({PROMPT_TOKENS} tokens) | decode ms/token | decode / bound "
             "| batch 8: tokens/s, x batch 1 | peak load RSS GiB | steady RSS GiB |", "|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        gain = batch_gain(r, 8)
        batched = f"{by_batch(r)[8]['aggregate_tokens_per_s']:.1f}, {gain:.2f}x" if gain is not None else "-"
        lines.append(f"| {label(r)} | {r['prefill_ms']:.0f} | {r['decode_ms']:.1f} | {r['decode_ms'] / r['bound_ms']:.2f} "
                     f"| {batched} | {r['peak_load_rss_gib']:.2f} | {r['steady_rss_gib']:.2f} |")
    return "\n".join(lines)


def with_caption(table):
    """A table renderer that puts the run's provenance above the table (for those whose own text has none)."""
    return lambda result: provenance.caption(result["provenance"]) + "\n\n" + table(result)


RENDERERS = {"summary": summary_table, "decoding": markdown_table, "batches": batch_table,
             "targets": with_caption(targets_table)}
# A block's text never runs into the next block (an empty block once swallowed everything up to the next end).
RENDERED = re.compile(r"(<!-- rendered: (\S+) (\S+) -->\n)((?:(?!<!-- rendered:).)*?)\n?(<!-- /rendered -->)", re.S)


def render(name, kind):
    """The table KIND (a RENDERERS key, or a serving run's "soak", "serving" or "prompts") of the committed run
    data/bench/NAME.json."""
    if kind in ("soak", "serving"):  # a serving run
        from helpers.tools.load_test import load_run as load_serving_run, serving_markdown, soak_table

        return {"soak": soak_table, "serving": serving_markdown}[kind](*load_serving_run(name))
    if kind == "prompts":
        from helpers.tools.prompt_bench import load_run as load_prompts_run, prompts_markdown

        return prompts_markdown(*load_prompts_run(name))
    return RENDERERS[kind](load_run(name))


def rendered_blocks(text):
    """[(name, kind, text between the markers)] for each `<!-- rendered: NAME KIND -->` block of a markdown text."""
    return [(match[2], match[3], match[4]) for match in RENDERED.finditer(text)]


def refresh(path):
    """Rewrite every rendered block of the markdown file at path from its committed run."""
    path = Path(path)
    path.write_text(RENDERED.sub(lambda m: m[1] + render(m[2], m[3]) + "\n" + m[5], path.read_text()))


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = result["records"]
    names = [label(r) for r in records]
    positions = range(len(records))
    fig, ax = plt.subplots(figsize=(11, 5))
    ax.bar([p - 0.2 for p in positions], [r["decode_ms"] for r in records], 0.4, label="decode ms/token (measured)")
    ax.bar([p + 0.2 for p in positions], [r["bound_ms"] for r in records], 0.4, label="bandwidth bound")
    ax.set_xticks(list(positions), names, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("ms per token")
    ax.set_yscale("log")
    made = result["provenance"]
    ax.set_title(f"RWKV-4 {result['shape']} decode, {result['threads']} threads: {made['machine']['cpu']}, {made['date']}",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    command = " ".join(["python -m helpers.tools.bench", *(argv if argv is not None else sys.argv[1:])])
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
