"""The committed runs as docs/, data/bench/README.md and the notebooks show them: each run's loader
(helpers.measure.results reads and checks the file), every Markdown table and summary line rendered from it,
and the rendered blocks of a Markdown file (`<!-- rendered: NAME KIND -->`), which
`python -m helpers.tools.bench --refresh FILE` rewrites from the runs.
"""
import re
import statistics
from pathlib import Path

from tabulate import tabulate

from helpers.measure import provenance
from helpers.measure.client import LoadResult, by_clients, latencies_ms, percentile
from helpers.measure.results import ChatTurn, PromptRun, SoakResult, read_run
from helpers.measure.perplexity import load_rows as load_quality_rows
from helpers.measure.sensitivity import load_kind_rows
from helpers.measure.workloads import BATCH_ROUNDS, BATCH_STEPS, DECODE_TOKENS, PROMPT_TOKENS, UNFUSED
from helpers.runtime.formats import CHOICES, body_and_head
from helpers.runtime.memory import BITS_PER_WEIGHT, GIB


def decoding_run(name):
    """The committed run data/bench/NAME.json, as run_benchmark returns it; StaleResults when it was measured
    with other kernel or loader code than this checkout's."""
    run = read_run(name)
    first = run["records"][0]
    return {"shape": first["shape"], "layout": first["layout"], "threads": first["threads"], "records": run["records"],
            "provenance": run["provenance"]}


def serving_run(name):
    """A committed run, data/bench/NAME.json: (its settings, [LoadResult]), or a soak's (settings, SoakResult);
    StaleResults when it was measured with other kernel, loader or serving code than this checkout's."""
    run = read_run(name)
    if "soak" in run:
        return {key: value for key, value in run.items() if key != "soak"}, SoakResult(**run["soak"])
    return {key: value for key, value in run.items() if key != "results"}, [LoadResult(**r) for r in run["results"]]


def prompts_run(name):
    """A committed run, data/bench/NAME.json: (its settings, PromptRun); StaleResults when measured with other
    kernel, loader or serving code than this checkout's."""
    run = read_run(name)
    result = run.pop("run")
    return run, PromptRun(**{**result, "chat": [ChatTurn(**turn) for turn in result["chat"]]})


def markdown(headers, rows):
    """A Markdown table (GitHub's), its cells shown as given: the callers format their numbers."""
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


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
    caption = (f"Shape {result['shape']} ({result['layout']} layout), {PROMPT_TOKENS}-token prompt, median of {DECODE_TOKENS} "
               f"greedy tokens; the read bandwidth is each option's median between its tokens, the best read "
               f"{max(r['best_bandwidth_gbs'] for r in result['records']):.1f} GB/s. " + provenance.caption(result["provenance"]))
    headers = ["option", "load s", "peak load RSS GiB", "steady RSS GiB", "weights in RAM GiB", "prefill ms",
               "decode ms/token", "tokens/s", "weight GiB read/token", "bound ms", "multiply-add bound ms", "decode / bound",
               "decode / best-read bound", "decode / fp32", "tokens = fp32's"]
    rows = [[label(r), f"{r['load_s']:.2f}", f"{r['peak_load_rss_gib']:.2f}", f"{r['steady_rss_gib']:.2f}",
             f"{r['model_bytes'] / GIB:.2f}", f"{r['prefill_ms']:.0f}", f"{r['decode_ms']:.1f}", f"{1000 / r['decode_ms']:.1f}",
             f"{r['weight_bytes'] / GIB:.2f}", f"{r['bound_ms']:.1f}", _optional(r.get("multiply_add_bound_ms")),
             f"{r['decode_ms'] / r['bound_ms']:.2f}",
             f"{r['decode_ms'] / r['best_bound_ms']:.2f}", f"{r['decode_ms'] / fp32['decode_ms']:.3f}" if fp32 else "-",
             f"{r['same_tokens']:.0%}"] for r in result["records"]]
    return f"{caption}\n\n{markdown(headers, rows)}"


def _optional(milliseconds):
    return "-" if milliseconds is None else f"{milliseconds:.1f}"


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
    caption = (f"Batched decoding, shape {result['shape']}: {BATCH_STEPS} steps of one token per sequence, median step "
               f"and its range over {BATCH_ROUNDS} rounds; the bound is one read of the weights per step (the option's "
               f"bandwidth in the decoding table). " + provenance.caption(result["provenance"]))
    headers = ["option", "batch", "step ms", "range ms", "aggregate tokens/s", "x batch 1", "step / bound",
               "sequences with their tokens alone"]
    cells = []
    for record, b in rows:
        gain = batch_gain(record, b["batch"])
        low, high = b["step_ms_range"]
        cells.append([label(record), str(b["batch"]), f"{b['step_ms']:.1f}", f"{low:.1f} to {high:.1f}",
                      f"{b['aggregate_tokens_per_s']:.1f}", f"{gain:.2f}" if gain is not None else "-",
                      f"{b['step_over_bound']:.2f}", f"{b['same_tokens_as_alone']:.0%}"])
    return f"{caption}\n\n{markdown(headers, cells)}"


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
    """The decoding targets, each with this run's figure, for the rows the run has."""
    records = result["records"]

    def find(option, kernel=None):
        return next((r for r in records if r["option"] == option and kernel in (None, r.get("kernel"))), None)

    rows = []
    avx2, unfused = find("sym_int4", "avx2"), find("sym_int4_unfused")
    if avx2:  # each figure is judged as the table prints it, to two decimals
        bound = max(avx2["bound_ms"], avx2.get("multiply_add_bound_ms") or 0)
        ratio = round(avx2["decode_ms"] / bound, 2)
        rows.append(("sym_int4 decode, avx2 build: at most 1.25x the larger of its bound and its multiply-add bound",
                     f"{avx2['decode_ms']:.1f} / {bound:.1f} ms = {ratio:.2f}x", ratio <= 1.25))
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
    return markdown(["target", "this run", "met"], [[target, figure, "yes" if met else "no"] for target, figure, met in rows])


def summary_table(result):
    """docs/benchmarks.md's table: per option and build, prefill, decode and its bound, and batch 8 against batch 1."""
    headers = ["option (build)", f"prefill ms ({PROMPT_TOKENS} tokens)", "decode ms/token", "decode / bound",
               "batch 8: tokens/s, x batch 1", "peak load RSS GiB", "steady RSS GiB"]
    rows = []
    for r in result["records"]:
        gain = batch_gain(r, 8)
        batched = f"{by_batch(r)[8]['aggregate_tokens_per_s']:.1f}, {gain:.2f}x" if gain is not None else "-"
        rows.append([label(r), f"{r['prefill_ms']:.0f}", f"{r['decode_ms']:.1f}", f"{r['decode_ms'] / r['bound_ms']:.2f}",
                     batched, f"{r['peak_load_rss_gib']:.2f}", f"{r['steady_rss_gib']:.2f}"])
    return (provenance.caption(result["provenance"]) + f" Shape {result['shape']}, {result['layout']} layout.\n\n"
            + markdown(headers, rows))


def _median_and_range(values, unit="", digits=1):
    return f"{statistics.median(values):.{digits}f}{unit} ({min(values):.{digits}f} to {max(values):.{digits}f})"


def round_ratios(record, first):
    """A side-by-side record's decode time over the first option's, round by round."""
    return [mine / theirs for mine, theirs in zip(record["decode_ms"], first["decode_ms"])]


def rounds_table(result):
    """helpers.tools.side_by_side's run: each option's decode time and its ratio to the first option's, round by
    round (median and range), and what it holds in memory against the first option."""
    records = result["records"]
    first = records[0]
    rounds = len(first["decode_ms"])
    caption = (f"Shape {result['shape']} ({result['layout']} layout): {rounds} rounds, in each every option decodes "
               f"{result['round_tokens']} greedy tokens in turn (its median ms per token); ratios are to "
               f"{first['option']}'s in the same round. " + provenance.caption(result["provenance"]))
    headers = ["option", "decode ms/token, median (range)", f"x {first['option']}, median (range)",
               "prefill ms, median", "weights read per token GiB", f"x {first['option']}", "load peak RSS GiB",
               "steady RSS GiB (x)", "same greedy tokens as the first"]
    rows = [[r["option"], _median_and_range(r["decode_ms"]),
             _median_and_range(round_ratios(r, first), "x", 3),
             f"{statistics.median(r['prefill_ms']):.0f}", f"{r['weight_bytes'] / GIB:.2f}",
             f"{r['weight_bytes'] / first['weight_bytes']:.3f}x", f"{r['peak_load_rss_gib']:.2f}",
             f"{r['steady_rss_gib']:.2f} ({r['steady_rss_gib'] / first['steady_rss_gib']:.3f}x)",
             "yes" if r["same_tokens"] else "no"] for r in records]
    return caption + "\n\n" + markdown(headers, rows)


def bits(low_bit):
    """'4.25' for a format, '4.25, head 8.5' for a mix: its bits per weight."""
    body, head = body_and_head(low_bit)
    return f"{BITS_PER_WEIGHT[body]:g}" if head == body else f"{BITS_PER_WEIGHT[body]:g}, head {BITS_PER_WEIGHT[head]:g}"


def decode_ratios(run):
    """{option: the median, over a side-by-side run's rounds, of its decode time over the first option's}."""
    first = run["records"][0]
    return {r["option"]: statistics.median(round_ratios(r, first)) for r in run["records"]}


SIDE_BY_SIDE_RUNS = {"1.5B": "rounds-1b5-hub", "7B": "rounds-7b-hub"}  # notebook 12's and the README's


def _percent(change):
    """'+0.31%', and '+0.00%' for a change that rounds to zero either way."""
    return f"{change if round(change, 4) else 0.0:+.2%}"


def formats_table(quality_name, speed_runs=SIDE_BY_SIDE_RUNS):
    """Per format and mix: its cost in the committed quality run quality_name (fused step) and its decode time
    against the first option's (sym_int4's) in each committed side-by-side run of speed_runs ({shape: run name})."""
    rows = load_quality_rows(quality_name)
    fp32 = next(row for row in rows if row.format == "fp32")
    fused = {row.format: row for row in rows if row.path == "fused"}
    runs = {shape: read_run(name) for shape, name in speed_runs.items()}
    ratios = [decode_ratios(run) for run in runs.values()]
    headers = ["format", "bits per weight", "KL from FP32 (nats)", "perplexity against FP32", "top-1 = FP32"] + [
        f"{shape} decode, x {run['records'][0]['option']}" for shape, run in runs.items()]  # ratios are to a run's first
    table = markdown(headers, [
        [low_bit, bits(low_bit), f"{fused[low_bit].kl_mean:.4f}", _percent(fused[low_bit].perplexity / fp32.perplexity - 1),
         f"{fused[low_bit].top1_agreement:.3f}"] + [f"{found[low_bit]:.2f}x" if low_bit in found else "-" for found in ratios]
        for low_bit in CHOICES if low_bit in fused])
    sources = [f"Quality: data/quality/{quality_name}.json (its machine and date: data/quality/README.md)."] + [
        f"{shape}: {provenance.caption(run['provenance'])}" for shape, run in runs.items()]
    return table + "\n\n" + "\n".join(f"- {line}" for line in sources)


def libraries_quality_table(quality_name):
    """Per format and path: perplexity and KL from FP32 in the committed quality run quality_name (bigdl-llm's)
    beside quality_name-ipex-llm (the same command on ipex-llm: its quantizer and its kernels)."""
    names = {"bigdl-llm": quality_name, "ipex-llm": f"{quality_name}-ipex-llm"}
    runs = {library: {(row.format, row.path): row for row in load_quality_rows(name)} for library, name in names.items()}
    keys = [key for key in runs["bigdl-llm"] if key[1] != "-" and key in runs["ipex-llm"]]

    def both(key, field, digits):
        return [_number(getattr(run[key], field), digits) for run in runs.values()]

    table = markdown(["format", "path", "perplexity, bigdl-llm", "perplexity, ipex-llm", "KL mean, bigdl-llm",
                      "KL mean, ipex-llm"],
                     [[*key, *both(key, "perplexity", 3), *both(key, "kl_mean", 5)] for key in keys])
    sources = "; ".join(f"{library}: data/quality/{name}.json" for library, name in names.items())
    return f"{table}\n\n{sources} (their machine and date: data/quality/README.md)."


def kernel_round_ratios(record):
    """A kernel sweep record's ratios, round by round: {"over_bound": products from memory over the larger of the
    read and multiply-add bounds (one token only), "cache_over_read": in cache over the read bound,
    "memory_over_cache": from memory over in cache}."""
    memory, cache, read = record["kernel_ms_rounds"], record["in_cache_ms_rounds"], record["bound_ms_rounds"]
    ratios = {"cache_over_read": [c / r for c, r in zip(cache, read)], "memory_over_cache": [m / c for m, c in zip(memory, cache)]}
    if "multiply_add_bound_ms_rounds" in record:
        ratios["over_bound"] = [m / max(r, a) for m, r, a in zip(memory, read, record["multiply_add_bound_ms_rounds"])]
    return ratios


def kernel_table(run):
    """A helpers.tools.kernel_sweep run: per thread count and tokens, the products from memory and in cache against
    the read bound and the multiply-add bound, each as the median of its rounds with their range."""
    rows = []
    for r in run["records"]:
        ratios = kernel_round_ratios(r)
        multiply_adds = r.get("multiply_add_bound_ms_rounds")
        times = (_median_and_range(r[f"{key}_rounds"]) for key in ("kernel_ms", "in_cache_ms", "bound_ms"))
        rows.append([r["threads"], r["tokens"], *times,
                     _median_and_range(multiply_adds) if multiply_adds else "-",
                     _median_and_range(ratios["over_bound"], digits=2) if "over_bound" in ratios else "-",
                     _median_and_range(ratios["cache_over_read"], digits=2),
                     _median_and_range(ratios["memory_over_cache"], digits=2)])
    table = markdown(["threads", "tokens", "from memory, ms", "in cache, ms", "read bound, ms", "multiply-add bound, ms",
                      "from memory / larger bound", "in cache / read bound", "from memory / in cache"], rows)
    return (f"{provenance.caption(run['provenance'])} The {run['shape']} shape's sym_int4 matrices, "
            f"{run['weight_bytes'] / GIB:.2f} GiB; each figure the median of {run['rounds']} rounds (lowest to highest), "
            f"a ratio taken round by round.\n\n{table}")


def with_caption(table):
    """A table renderer that puts the run's provenance above the table (for those whose own text has none)."""
    return lambda result: provenance.caption(result["provenance"]) + "\n\n" + table(result)


RENDERERS = {"summary": summary_table, "decoding": markdown_table, "batches": batch_table,
             "targets": with_caption(targets_table)}


# A block's text never runs into the next block (an empty block once swallowed everything up to the next end).
RENDERED = re.compile(r"(<!-- rendered: (\S+) (\S+) -->\n)((?:(?!<!-- rendered:).)*?)\n?(<!-- /rendered -->)", re.S)


def render(name, kind):
    """The table KIND (a RENDERERS key, or a serving run's "soak", "serving" or "prompts") of the committed run
    data/bench/NAME.json (for "rounds", a side-by-side run; "kernel", a kernel sweep); or, for "kinds" and
    "formats", of the quality run data/quality/NAME.json (for "quality", its rows; "libraries": beside NAME-ipex-llm.json)."""
    if kind == "kinds":
        return kinds_table(load_kind_rows(name))
    if kind == "formats":
        return formats_table(name)
    if kind == "libraries":
        return libraries_quality_table(name)
    if kind == "quality":
        return quality_table(load_quality_rows(name))
    if kind == "kernel":  # helpers.tools.kernel_sweep's
        return kernel_table(read_run(name))
    if kind == "rounds":  # helpers.tools.side_by_side's
        return rounds_table(read_run(name))
    if kind in ("soak", "serving"):  # a serving run
        return soak_table(*serving_run(name)) if kind == "soak" else serving_markdown(*serving_run(name), targets=True)
    if kind == "prompts":
        return prompts_markdown(*prompts_run(name), targets=True)
    return RENDERERS[kind](decoding_run(name))


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


LOAD_HEADERS = ["clients", "answered", "tokens/s", "first token p50 (ms)", "p95", "last token p50 (ms)", "p95"]


def _against(target, met, targets):
    """"; target ...: met" (or "missed"), or nothing where targets is False (the lessons show the figures alone)."""
    return f"; target {target}: {'met' if met else 'missed'}" if targets else ""


def step_line(settings, results, targets=False):
    """The most clients' tokens/s against the batched step's own, each measured in every round of one run."""
    most = by_clients(results)[max(r.clients for r in results)]
    ratios = [result.tokens_per_s / step for result, step in zip(most, settings["step_tokens_per_s"])]
    return (f"{most[0].clients} clients: {statistics.median(r.tokens_per_s for r in most):.0f} tokens/s; round by round, "
            f"{min(ratios):.2f}x to {max(ratios):.2f}x the batched step alone (median {statistics.median(ratios):.2f}x; the "
            f"step: {statistics.median(settings['step_tokens_per_s']):.0f} tokens/s, {most[0].clients} sequences, measured "
            f"after each round{_against('at least 0.85x', round(statistics.median(ratios), 2) >= 0.85, targets)})"
            + _thread_cost(settings))


OTHER_THREADS = {"step_in_long_lived_thread_tokens_per_s": "in a thread that ran it every round, as the worker's model thread does",
                 "step_in_thread_tokens_per_s": "in a new thread started for it"}


def _thread_cost(settings):
    """". Against the main thread's time ...": the step's time in other threads, round by round against the main
    thread's, where the run timed it there."""
    parts = []
    for key, where in OTHER_THREADS.items():
        if settings.get(key):
            ratios = [main / other for main, other in zip(settings["step_tokens_per_s"], settings[key])]
            parts.append(f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}x to {max(ratios):.2f}x) {where}")
    return f". Against the main thread's time, the step took {'; '.join(parts)}" if parts else ""


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


SOAK_HEADERS = ["requests", "clients", "answered", "refused (429)", "cancelled", "lost", "minutes",
                "worker MB after 200", "after all", "growth"]


def soak_table(settings, result):
    """A soak's markdown: its provenance and settings, then one row (SOAK_HEADERS)."""
    first, last = result.rss_mb["after_first"], result.rss_mb["after_all"]
    row = [result.requests, result.clients, result.outcomes.get("answered", 0),
           f"{result.outcomes.get('refused', 0)} ({result.refused_429})", result.outcomes.get("cancelled", 0),
           result.outcomes.get("lost", 0), f"{result.seconds / 60:.1f}", f"{first:.0f}", f"{last:.0f}",
           f"{result.rss_growth:+.1%}"]
    queue = settings["max_queue"] if settings["max_queue"] is not None else settings["max_batch"]
    return "\n".join([
        provenance.caption(settings["provenance"]) + f" {settings['model']}, one worker (--max-batch "
        f"{settings['max_batch']}, --max-queue {queue}). A cancelled request was decoded at most "
        f"{result.worker['most_steps_after_cancel']} step(s) after the worker saw its client go; \"cancelled\" counts "
        "the clients that closed their stream early (the worker's own count leaves out those already answered).", "",
        markdown(SOAK_HEADERS, [row])])


def serving_markdown(settings, results, targets=False):
    """A committed load test as markdown: its provenance and settings, the table, and the batched step's line."""
    lines = [f"{settings['model']}: {settings['requests']} requests of {settings['max_tokens']} tokens per client count, "
             f"{settings['rounds']} rounds (tokens/s: median and range). " + provenance.caption(settings["provenance"]), "",
             markdown(LOAD_HEADERS, load_rows(results))]
    return "\n".join(lines + (["", step_line(settings, results, targets)] if settings.get("step_tokens_per_s") else []))


def chat_table(turns):
    """Markdown: per turn, its prompt tokens, the tokens read and the first token's ms (medians over rounds)."""
    median = statistics.median
    headers = ["turn", "prompt tokens", "read, cache on", "first token ms, cache on", "without the cache",
               "new message alone (tokens read)", "cache on / alone"]
    return markdown(headers, [[str(turn.turn), str(turn.prompt_tokens), f"{median(turn.cached_read):.0f}",
                               f"{median(turn.cached_ms):.0f}", f"{median(turn.uncached_ms):.0f}",
                               f"{median(turn.alone_ms):.0f} ({median(turn.alone_read):.0f})",
                               f"{median(turn.cached_ms) / median(turn.alone_ms):.2f}"] for turn in turns])


def summary_lines(run, settings, targets=False):
    """One line per scenario, each with its target and whether it was met (where targets is True)."""
    median = statistics.median
    shared, separate = percentile(run.shared_ms, 0.5), percentile(run.separate_ms, 0.5)
    median_gap, p99 = percentile(run.gaps_before_ms, 0.5), percentile(run.gaps_during_ms, 0.99)
    last = run.chat[-1]
    turn, system, gaps = (median(last.cached_ms) / median(last.alone_ms), shared / separate, p99 / median_gap)
    return [
        f"Chat turn {last.turn} ({last.prompt_tokens} prompt tokens, {median(last.cached_read):.0f} read): first token in "
        f"{median(last.cached_ms):.0f} ms from the cache, {turn:.2f}x the new message alone ({median(last.alone_ms):.0f} ms"
        f"{_against('at most 1.5x', round(turn, 2) <= 1.5, targets)}); {median(last.uncached_ms):.0f} ms without the cache.",
        f"A {settings['system_tokens']}-token system prompt, {settings['clients']} clients at once: first token p50 "
        f"{shared:.0f} ms shared, {separate:.0f} ms when each reads its own ({system:.2f}x"
        f"{_against('at most 0.2x', round(system, 2) <= 0.2, targets)}).",
        f"While a {run.long_prompt_tokens}-token prompt was read ({run.long_first_ms / 1000:.1f} s to its first token), "
        f"{settings['streams']} running streams' gaps between tokens: p99 {p99:.0f} ms against their median "
        f"{median_gap:.0f} ms before it ({gaps:.1f}x{_against('under 3x', round(gaps, 1) < 3, targets)}); median "
        f"{percentile(run.gaps_during_ms, 0.5):.0f} ms, longest {max(run.gaps_during_ms):.0f} ms while it was read.",
    ]


def prompts_markdown(settings, run, targets=False):
    """A committed run as markdown: its provenance, the chat's turns, and the three scenarios' lines."""
    return "\n".join([f"{settings['model']}, {settings['rounds']} rounds (medians). " + provenance.caption(settings["provenance"]),
                      "", chat_table(run.chat), "", *[f"- {line}" for line in summary_lines(run, settings, targets)]])


def _number(value, digits):
    """A quality figure to `digits` decimals; "" where the row has none (FP32's KL, the unigram baseline's)."""
    return "" if value is None else f"{value:.{digits}f}"


def quality_table(rows):
    """The rows of helpers.measure.perplexity as a Markdown table."""
    return markdown(["format", "path", "perplexity", "KL mean", "KL p99", "top-1 = FP32", "tokens"],
                    [[row.format, row.path, f"{row.perplexity:.3f}", _number(row.kl_mean, 5), _number(row.kl_p99, 4),
                      _number(row.top1_agreement, 4), str(row.tokens)] for row in rows])


def kinds_table(rows):
    """The rows of helpers.measure.sensitivity (each kind of matrix quantized alone) as a Markdown table."""
    return markdown(["format", "matrix quantized alone", "share of the linear weights", "perplexity", "KL mean", "KL p99",
                     "top-1 = FP32", "tokens"],
                    [[row.format, row.kind, f"{row.weight_share:.1%}", f"{row.perplexity:.3f}", f"{row.kl_mean:.5f}",
                      f"{row.kl_p99:.4f}", f"{row.top1_agreement:.4f}", str(row.tokens)] for row in rows])
