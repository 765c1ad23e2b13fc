"""Plots the notebooks show."""
import matplotlib.pyplot as plt


def plot_long_run(run):
    """Per-token latency and RSS over a long generation (helpers.streaming.long_run)."""
    tokens = range(1, len(run.latency_ms) + 1)
    fig, (latency, memory) = plt.subplots(1, 2, figsize=(10, 3.2))
    latency.plot(tokens, run.latency_ms, linewidth=0.6)
    latency.set(xlabel="generated token", ylabel="ms per token", title="Per-token latency", ylim=(0, None))
    memory.plot(tokens, [b / 2**30 for b in run.rss_bytes])
    memory.set(xlabel="generated token", ylabel="GiB", title="Resident memory (RSS)", ylim=(0, None))
    fig.tight_layout()
    plt.show()


def plot_threads(results):
    """Decode tokens/s against thread count (helpers.tuning)."""
    threads, speeds = zip(*results)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(threads, speeds, marker="o")
    ax.set(xlabel="threads (OMP_NUM_THREADS)", ylabel="tokens/s", title="INT4 decode speed", ylim=(0, None))
    ax.set_xticks(threads)
    fig.tight_layout()
    plt.show()
