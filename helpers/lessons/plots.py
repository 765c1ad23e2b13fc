"""Plots the notebooks show."""
import statistics

import matplotlib.pyplot as plt


def plot_long_run(run):
    """Per-token latency and RSS over a long generation (helpers.lessons.streaming.long_run)."""
    tokens = range(1, len(run.latency_ms) + 1)
    fig, (latency, memory) = plt.subplots(1, 2, figsize=(10, 3.2))
    latency.plot(tokens, run.latency_ms, linewidth=0.6)
    latency.set(xlabel="generated token", ylabel="ms per token", title="Per-token latency", ylim=(0, None))
    memory.plot(tokens, [b / 2**30 for b in run.rss_bytes])
    memory.set(xlabel="generated token", ylabel="GiB", title="Resident memory (RSS)", ylim=(0, None))
    fig.tight_layout()
    plt.show()


def plot_quality(rows):
    """Perplexity, and KL divergence from FP32, against bytes per weight: a point per low-bit format, on the
    fused path where it ran (helpers.measure.perplexity rows)."""
    from helpers.runtime.memory import BYTES_PER_WEIGHT

    path = "fused" if any(row.path == "fused" for row in rows) else "torch"
    points = [row for row in rows if row.path == path]
    fp32 = next((row for row in rows if row.format == "fp32"), None)
    sizes = [BYTES_PER_WEIGHT[row.format] for row in points]
    fig, (perplexity, divergence) = plt.subplots(1, 2, figsize=(10, 3.4))
    perplexity.plot(sizes, [row.perplexity for row in points], marker="o")
    for row, size in zip(points, sizes):
        perplexity.annotate(row.format, (size, row.perplexity), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if fp32:
        perplexity.axhline(fp32.perplexity, linestyle="--", color="grey", label="FP32 (4 bytes per weight)")
        perplexity.legend()
        divergence.plot(sizes, [row.kl_mean for row in points], marker="o", label="mean")
        divergence.plot(sizes, [row.kl_p99 for row in points], marker="s", linestyle=":", label="99th percentile")
        divergence.set(yscale="log", xlabel="bytes per weight", ylabel="nats", title="KL divergence from FP32")
        divergence.legend()
    perplexity.set(xlabel="bytes per weight", ylabel="perplexity", title=f"Held-out perplexity ({path} path)")
    fig.tight_layout()
    plt.show()


def plot_kinds(rows):
    """KL divergence from FP32 when one kind of matrix alone is quantized, beside that kind's share of the
    linear weights (helpers.measure.sensitivity rows)."""
    kinds = [row.kind for row in rows]
    fig, (divergence, share) = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    divergence.barh(kinds, [row.kl_mean for row in rows])
    divergence.set(xlabel="nats", title=f"Mean KL from FP32, {rows[0].format} in that matrix alone")
    share.barh(kinds, [100 * row.weight_share for row in rows], color="grey")
    share.set(xlabel="%", title="Share of the linear weights")
    divergence.invert_yaxis()
    fig.tight_layout()
    plt.show()


def plot_threads(measured):
    """Decode tokens/s against thread count, the median and the range of the rounds (helpers.lessons.tuning)."""
    measured = {int(label): m for label, m in measured.items() if label.isdigit()}  # the reference has its own row
    threads = list(measured)
    medians = [m.median for m in measured.values()]
    spreads = [[m.median - min(m.speeds) for m in measured.values()], [max(m.speeds) - m.median for m in measured.values()]]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.errorbar(threads, medians, yerr=spreads, marker="o", capsize=4)
    ax.set(xlabel="threads (OMP_NUM_THREADS)", ylabel="tokens/s", title="INT4 decode speed", ylim=(0, None))
    ax.set_xticks(threads)
    fig.tight_layout()
    plt.show()


def plot_kernel_sweeps(sweeps):
    """The fused step's weight reading against threads, next to its bandwidth bound (helpers/tools/kernel_sweep.py)."""
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 3.2))
    for ax, sweep in zip([axes] if len(sweeps) == 1 else axes, sweeps):
        threads = [r["threads"] for r in sweep["records"]]
        ax.plot(threads, [r["kernel_ms"] for r in sweep["records"]], marker="o", label="fused INT4 kernel")
        ax.plot(threads, [r["bound_ms"] for r in sweep["records"]], linestyle="--", label="bandwidth bound")
        ax.set(xlabel="threads", ylabel="ms per token", title=f"{sweep['shape']}: weights of one token", ylim=(0, None))
        ax.set_xticks(threads)
        ax.legend()
    fig.tight_layout()
    plt.show()


def plot_chat_turns(turns):
    """Per chat turn: the time to read the whole history again against reading the new turn into the
    carried state (notebook 06)."""
    numbers = [turn["turn"] for turn in turns]
    fig, (latency, length) = plt.subplots(1, 2, figsize=(10, 3.2))
    latency.plot(numbers, [turn["reread_ms"] for turn in turns], marker="o", label="re-read the whole history")
    latency.plot(numbers, [turn["carried_ms"] for turn in turns], marker="o", label="new turn into the carried state")
    latency.set(xlabel="turn", ylabel="ms to read", title="Reading a turn", ylim=(0, None))
    latency.legend()
    length.plot(numbers, [turn["history_tokens"] for turn in turns], marker="o", label="whole history")
    length.plot(numbers, [turn["new_tokens"] for turn in turns], marker="o", label="new turn")
    length.set(xlabel="turn", ylabel="tokens read", title="Tokens read per turn", ylim=(0, None))
    length.legend()
    fig.tight_layout()
    plt.show()


def plot_batches(measured):
    """A server's view of batched decoding (helpers.measure.timing.measure_batches): tokens/s of all sequences
    together, and each sequence's time per token, against the batch size; batch 1 is one client alone."""
    batches = list(measured)
    fig, (throughput, latency) = plt.subplots(1, 2, figsize=(10, 3.2))
    throughput.plot(batches, [m.aggregate_tokens_per_s for m in measured.values()], marker="o")
    throughput.set(xlabel="sequences decoded together", ylabel="tokens/s, all sequences", title="Server throughput",
                   ylim=(0, None))
    steps = [sorted(m.step_ms) for m in measured.values()]
    medians = [s[len(s) // 2] for s in steps]
    latency.errorbar(batches, medians, yerr=[[m - s[0] for m, s in zip(medians, steps)],
                                             [s[-1] - m for m, s in zip(medians, steps)]], marker="o", capsize=4)
    latency.axhline(medians[0], linestyle="--", color="gray", label="one client alone")
    latency.set(xlabel="sequences decoded together", ylabel="ms per token, each sequence", title="Latency per token",
                ylim=(0, None))
    latency.legend()
    for ax in (throughput, latency):
        ax.set_xticks(batches)
    fig.tight_layout()
    plt.show()


def plot_load(results):
    """A load test (helpers.tools.load_test): tokens/s of all clients (median of the rounds), and the p50
    and p95 latency to the first and to the last token, against the number of clients."""
    from helpers.measure.client import by_clients, latencies_ms, percentile

    grouped = by_clients(results)
    clients = list(grouped)
    fig, (throughput, latency) = plt.subplots(1, 2, figsize=(10, 3.2))
    throughput.plot(clients, [statistics.median(r.tokens_per_s for r in rounds) for rounds in grouped.values()],
                    marker="o")
    throughput.set(xlabel="concurrent clients", ylabel="tokens/s, all clients", title="Server throughput", ylim=(0, None))
    for until, style in (("first", "o-"), ("last", "s-")):
        for share, alpha in ((0.5, 1.0), (0.95, 0.5)):
            values = [percentile(latencies_ms(rounds, until), share) for rounds in grouped.values()]
            latency.plot(clients, values, style, alpha=alpha, label=f"{until} token, p{round(share * 100)}")
    latency.set(xlabel="concurrent clients", ylabel="ms from sending", title="Latency", ylim=(0, None))
    latency.legend()
    _show(fig, clients)


def plot_served_chat(turns):
    """A chat over the API turn by turn (helpers.measure.results.ChatTurn): the first token's ms with the
    state cache, without it, and for the new message alone; and the prompt tokens against those read."""
    numbers = [turn.turn for turn in turns]
    fig, (latency, tokens) = plt.subplots(1, 2, figsize=(10, 3.2))
    for label, field, style in (("without the cache", "uncached_ms", "s-"), ("state cache", "cached_ms", "o-"),
                                ("new message alone", "alone_ms", "^:")):
        latency.plot(numbers, [statistics.median(getattr(turn, field)) for turn in turns], style, label=label)
    latency.set(xlabel="turn", ylabel="ms to the first token", title="A chat over the API", ylim=(0, None))
    latency.legend()
    tokens.plot(numbers, [turn.prompt_tokens for turn in turns], "s-", label="in the prompt")
    tokens.plot(numbers, [statistics.median(turn.cached_read) for turn in turns], "o-", label="read, state cache")
    tokens.set(xlabel="turn", ylabel="tokens", title="Prompt tokens each turn", ylim=(0, None))
    tokens.legend()
    _show(fig, numbers)


def _show(fig, ticks):
    """Show a figure whose axes share the x values `ticks`, each of them marked."""
    for ax in fig.axes:
        ax.set_xticks(ticks)
    fig.tight_layout()
    plt.show()
