"""What notebook 04 measures: decode speed against threads, decoding kernels, OpenMP and allocators, pinning.

Each configuration runs in a process of its own (threads, LD_PRELOAD and the kernel build are fixed when
a process starts):  python -m helpers.lessons.tuning --worker  loads the measured model (measured_source), then
prints one JSON line with its decode speed for each line it reads. Each configuration is measured in
ROUNDS rounds, taking turns within a round, beside the REFERENCE configuration (all physical cores, the
defaults), which runs in every section's rounds so that the machine's drift shows. A configuration wins
only where its slowest round beats every other's fastest and its lead is larger than the reference's own
range over the same rounds.
"""
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass

from helpers.lessons.environment import init_script_settings
from helpers.measure import provenance
from helpers.measure.worker_process import WorkerProcess
from helpers.runtime import fused_decode
from helpers.runtime.settings import read as read_settings
from helpers.runtime.cpu import CpuInfo, cpu_info, cpu_list
from helpers.runtime.paths import DATA_DIR
from helpers.runtime import library, startup

PROMPT_TOKENS, DECODE_TOKENS = 16, 48
ROUNDS = 3
# Without RWKV_MODEL: the 169M shape, random weights (as fast as real ones). Reading its weights is most of
# a token's time (from memory, or partly from a large L3 cache); the model trained here is so small that
# fixed costs are.
MEASURED_SHAPE = "169m"
REFERENCE = "reference (all cores, defaults)"
SETTLE_S = 0.25  # before each measurement: the last one's idle OpenMP threads may spin this long (Intel's default 200 ms)
SWEEPS_DIR = DATA_DIR / "sweeps"
RUNTIMES = {  # name: bigdl-llm-init (or ipex-llm-init) options
    "Intel OpenMP, system malloc": "",
    "Intel OpenMP, jemalloc": "-j",
    "Intel OpenMP, tcmalloc": "-t",
    "GNU OpenMP, system malloc": "-o",
}


class _Configuration(WorkerProcess):
    """A process that loads the notebooks' model (RWKV_MODEL or the model trained here) in one configuration,
    then measures its decode speed each time it is asked."""

    def __init__(self, threads, env=None, prefix=()):
        super().__init__("helpers.lessons.tuning", ["--worker"], threads, env, prefix)

    def wait_until_loaded(self):
        assert self.read() == {"loaded": True}

    def tokens_per_s(self):
        time.sleep(SETTLE_S)
        return self.ask()["tokens_per_s"]


def measured_source():
    """The model notebook 04 measures: RWKV_MODEL's, else the MEASURED_SHAPE checkpoint (built on first use)."""
    from helpers.measure.checkpoints import ensure_checkpoint
    from helpers.runtime.models import resolve_model

    return resolve_model(None if read_settings().model else str(ensure_checkpoint(MEASURED_SHAPE, layout="hub")))


def thread_counts():
    """1, 2, 4, ... threads, and all physical cores."""
    cores = cpu_info().physical_cores
    return sorted({*(2**power for power in range(cores.bit_length()) if 2**power < cores), cores})


@dataclass
class Measured:
    speeds: list  # decode tokens/s, one per round
    command: str = ""  # the shell line that runs a script of one's own in the same configuration

    @property
    def median(self):
        return statistics.median(self.speeds)


def shell_line(threads, env=None, prefix=(), init=None):
    """The line that runs `python my_script.py` with `threads` OpenMP threads, after `source bigdl-llm-init INIT`
    (where init is not None), with the variables env and under the command prefix (taskset, numactl)."""
    source = [f"source {library.init_script()} {init}".rstrip() + ";"] if init is not None else []
    assignments = [f"{name}={value}" for name, value in (env or {}).items()]
    return " ".join([*source, *assignments, f"OMP_NUM_THREADS={threads}", *prefix, "python my_script.py"])


def measure_in_rounds(configurations, rounds=ROUNDS):
    """{label: Measured} for REFERENCE and {label: dict(threads=..., env=..., prefix=..., init=...)} (init: the
    options of `source bigdl-llm-init` whose environment the process gets), in alternating rounds; each
    configuration's process starts (and loads the model) once."""
    configurations = {REFERENCE: dict(threads=cpu_info().physical_cores), **configurations}
    processes = {}
    for label, settings in configurations.items():
        init = settings.get("init")
        env = {**(settings.get("env") or {}), **(runtime_env(init) if init is not None else {})}
        processes[label] = _Configuration(settings["threads"], env, settings.get("prefix", ()))
    try:
        for process in processes.values():  # no measurement while another process is still loading
            process.wait_until_loaded()
        measured = {label: Measured([], shell_line(**settings)) for label, settings in configurations.items()}
        for _ in range(rounds):
            for label, process in processes.items():
                measured[label].speeds.append(process.tokens_per_s())
        return measured
    finally:
        for process in processes.values():
            process.close()


def rows(measured):
    return [(label, f"{m.median:.1f} tokens/s", f"{min(m.speeds):.1f} to {max(m.speeds):.1f}", f"`{m.command}`")
            for label, m in measured.items()]


def headers(title):
    return [title, "median decode speed", f"range over {ROUNDS} rounds", "the same for a script of yours"]


def batch_rows(measured):
    """Table rows of helpers.measure.timing.measure_batches' results: a server's step against a client's."""
    single = measured[min(measured)].aggregate_tokens_per_s
    return [(batch, f"{m.aggregate_tokens_per_s:.1f}", f"{m.aggregate_tokens_per_s / single:.2f}x",
             f"{statistics.median(m.step_ms):.1f} ms", f"{min(m.step_ms):.1f} to {max(m.step_ms):.1f}",
             f"{m.same_as_alone:.0%}") for batch, m in measured.items()]


BATCH_HEADERS = ["sequences together", "tokens/s, all", "x one client", "ms per step (each one's token)",
                 "range over rounds", "sequences with their tokens alone"]


def drift(measured):
    """The reference's range over its rounds, relative to its median: how much the machine itself moved."""
    reference = measured.get(REFERENCE)
    return (max(reference.speeds) - min(reference.speeds)) / reference.median if reference else 0.0


def _ranked(measured):
    """(best label, its lead over the next best median as a fraction), the reference left out."""
    candidates = {label: m for label, m in measured.items() if label != REFERENCE}
    best = max(candidates, key=lambda label: candidates[label].median)
    others = [m.median for label, m in candidates.items() if label != best]
    return best, (candidates[best].median / max(others) - 1 if others else 0.0)


def winner(measured):
    """The label whose slowest round beats every other configuration's fastest and whose median leads the
    next by more than the reference's drift, else None."""
    best, lead = _ranked(measured)
    others = [max(m.speeds) for label, m in measured.items() if label not in (best, REFERENCE)]
    return best if others and min(measured[best].speeds) > max(others) and lead > drift(measured) else None


def against_reference(label, measured):
    """'LABEL: 5.4x slower than the reference, beyond the spread': a configuration's median against the
    reference's, and whether their rounds lie apart by more than the reference moved."""
    m, reference = measured[label], measured[REFERENCE]
    factor = m.median / reference.median
    apart = ((min(m.speeds) > max(reference.speeds) or max(m.speeds) < min(reference.speeds))
             and abs(factor - 1) > drift(measured))
    times = max(factor, 1 / factor)
    times = f"{times:.2f}x" if times < 2 else f"{times:.1f}x"
    pace = f"{factor:.2f}x as fast as" if 0.995 <= factor < 1.005 else (
        f"{times} faster than" if factor > 1 else f"{times} slower than")
    return f"{label}: {pace} the reference, {'beyond' if apart else 'within'} the spread"


def verdict(title, measured):
    """The winner (or that there is none), then every configuration against the reference."""
    best, lead = _ranked(measured)
    moved = f"the reference moved {drift(measured):.0%} over the same rounds"
    if winner(measured):
        head = f"{title}: {best} is fastest here, {lead:.0%} ahead, beyond the rounds' spread ({moved})"
    else:
        head = (f"{title}: no measurable difference between the best two here (best: {best}, {lead:.0%} ahead, "
                f"within the rounds' spread or the drift: {moved})")
    if REFERENCE not in measured:
        return head
    return "\n".join([head, *(f"  {against_reference(label, measured)}" for label in measured if label != REFERENCE)])


def drift_rows(sections):
    """Rows for {section: measured}: the reference's median and range in each section's rounds, then how far
    its medians lie apart across the sections (what comparing numbers from different sections would risk)."""
    references = {section: measured[REFERENCE] for section, measured in sections.items()}
    rows = [(section, f"{m.median:.1f} tokens/s", f"{min(m.speeds):.1f} to {max(m.speeds):.1f}")
            for section, m in references.items()]
    medians = [m.median for m in references.values()]
    rows.append(("across sections", f"{min(medians):.1f} to {max(medians):.1f}", f"{max(medians) / min(medians) - 1:.0%} apart"))
    return rows


def chosen_threads(threads_measured):
    """The measured winner, else (no measurable difference) one thread per physical core."""
    return int(winner(threads_measured) or cpu_info().physical_cores)


def decoding_kernels():
    """{label: environment}: each build of the fused step this CPU runs (helpers.runtime.fused_decode), then
    the torch path on the bigdl-llm build helpers chose (notebook 01), as on a machine without a compiler."""
    kernels = {f"fused step, {kernel} build": {"RWKV_FUSED_KERNEL": kernel}
               for kernel in fused_decode.runnable_kernels()} if fused_decode.library() is not None else {}
    kernels[f"torch path, {library.name()} {startup.start().build}"] = {"RWKV_FUSED_DECODE": "0"}
    return kernels


def runtime_env(options):
    """The environment `source bigdl-llm-init OPTIONS` would give a program started after it."""
    settings = init_script_settings(options, shorten=False)
    return {"LD_PRELOAD": settings.get("LD_PRELOAD", ""),
            **({"MALLOC_CONF": settings["MALLOC_CONF"]} if "MALLOC_CONF" in settings else {})}


def pinnings(threads, info=None, cpus=None):
    """{label: command prefix} for running unpinned and pinned to the first `threads` physical cores (one
    logical CPU of each) among cpus (default: the ones this process may use)."""
    placed = (info or cpu_info()).physical_cores_of(cpus)
    cores = cpu_list(logical[0] for logical in list(placed.values())[:threads])
    options = {"not pinned": (), f"taskset -c {cores}": ("taskset", "-c", cores)}
    if shutil.which("numactl"):
        options[f"numactl -C {cores} -m 0"] = ("numactl", "-C", cores, "-m", "0")
    return options


def kernel_sweeps():
    """The committed runs of helpers/tools/kernel_sweep.py on a bigger machine (data/sweeps/), smallest shape first,
    each with "current": whether the kernel source it timed is this checkout's, and its records of one token (a run
    with --tokens 1,8 also has steps of 8; runs before --tokens have one token only)."""
    sweeps = [json.loads(path.read_text()) for path in sorted(SWEEPS_DIR.glob("fused-kernel-*.json"))]
    return [{**sweep, "current": provenance.is_current(sweep["provenance"]),
             "records": [r for r in sweep["records"] if r.get("tokens", 1) == 1]} for sweep in sweeps]


def sweep_caption(sweep):
    """Where a sweep comes from, and whether its kernel is this checkout's, in one line."""
    made = sweep["provenance"]
    kernel = ("the current kernel source" if sweep["current"] else
              f"an older kernel source (fingerprint {made['fingerprint']}, this checkout's "
              f"{provenance.fingerprint('kernel')}; its thread scaling, not its milliseconds, carries over)")
    return f"Measured {made['date']} on {provenance.describe(made['machine'])}, 1 to {made['threads']} threads, with {kernel}."


def fastest_threads(sweep):
    """The thread count at which the sweep's kernel read one token's weights fastest."""
    return min(sweep["records"], key=lambda record: record["kernel_ms"])["threads"]


def two_socket_server(sweep):
    """A server of two sockets, each like the sweep's one-socket machine (its cores on each), as CpuInfo."""
    machine = sweep["provenance"]["machine"]
    return CpuInfo(machine["vendor"], machine["cpu"], 2 * machine["physical_cores"], 2, frozenset({"avx2"}))


def measured_choices(threads_measured, runtime_measured, pinning_measured):
    """(threads, runtime, pinning) that won on this machine; None (the default) where nothing won."""
    return chosen_threads(threads_measured), winner(runtime_measured), winner(pinning_measured)


def recommended_commands(threads, runtime=None, pinning=None, info=None, numactl=None):
    """(client command, server commands, notes) for the chosen settings (None: no preloaded libraries, not
    pinned) on a machine (info and numactl: this one's). A client runs one process; a server runs the serving
    stack (helpers.serving), one worker per socket on that socket's cores (each worker runs a thread per
    physical core it has). The notes say what could not be measured there."""
    cpus = range(info.physical_cores) if info else None  # a described machine's, numbered core by core
    info = info or cpu_info()
    numactl = bool(shutil.which("numactl")) if numactl is None else numactl
    init = [f"source {library.init_script()} {RUNTIMES[runtime]}".rstrip()] if runtime else []
    pin = pinnings(threads, info, cpus)[pinning] if pinning else ()
    client = "\n".join([*init, " ".join([f"OMP_NUM_THREADS={threads}", *pin, "python -m helpers.tools.generate"])])
    if info.sockets > 1 and numactl:
        controller = "http://127.0.0.1:21001"
        server = [*init, f"python -m fastchat.serve.controller --port {controller.rsplit(':', 1)[1]} &"]
        server += [f"numactl --cpunodebind={socket} --membind={socket} python -m helpers.serving.worker "
                   f"--controller-address {controller} --port {21002 + socket} &" for socket in range(info.sockets)]
        server.append(f"python -m helpers.serving.api_server --controller-address {controller} --port 8000")
    else:  # one worker per socket, each pinned to its share of the cores (helpers.serving.stack)
        server = [*init, f"python -m helpers.serving --workers {info.sockets} --port 8000"]
    notes = [note for note, applies in (
        ("numactl is not installed (`apt install numactl`): each worker is pinned to its socket's cores, but its "
         "memory is not placed on that socket", not numactl and info.sockets > 1),
        ("one socket: the server is one worker on all its physical cores, decoding many users' sequences together "
         "(notebook 09); the client decodes one, on the threads measured above", info.sockets == 1),
    ) if applies]
    return client, "\n".join(server), notes


def worker():
    import torch

    startup.start()
    from helpers.measure.timing import timed_greedy_decode
    from helpers.runtime.loading import load_model

    torch.set_num_threads(read_settings().omp_threads)
    model = load_model(measured_source(), "sym_int4", report=lambda line: print(line, file=sys.stderr))
    prompt = torch.arange(1, PROMPT_TOKENS + 1).unsqueeze(0)
    timed_greedy_decode(model, prompt, DECODE_TOKENS)  # warm up: every round then measures a warm process
    print(json.dumps({"loaded": True}), flush=True)
    for _ in sys.stdin:  # one measurement per line read, until the notebook closes the pipe
        run = timed_greedy_decode(model, prompt, DECODE_TOKENS)
        print(json.dumps({"tokens_per_s": 1000 / statistics.median(run.latency_ms)}), flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker()
