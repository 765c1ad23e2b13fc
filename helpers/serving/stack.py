"""The serving stack on one machine: FastChat's controller, RWKV workers, the OpenAI-compatible API server.

    python -m helpers.serving [--port 8000] [--workers 2] [--model PATH_OR_ID] [--max-batch 16] [--max-queue 16]
                              [--state-cache-mb 256]
                              [--host 127.0.0.1] [--api-keys KEY1,KEY2]           (what `make serve` runs)

The controller and workers listen on 127.0.0.1 and take free ports; the API server listens on --host
(another address than loopback only with API keys). With several workers, each is pinned to its own share
of the cores. Each process writes its log into build/serving/. A worker that stops, or reports itself
unhealthy, is restarted after a back-off that grows while it keeps failing (RESTART_BACKOFF_S), and the
stack says so. Ctrl-C stops them all; so does the end of the Python process that started them.
"""
import argparse
import ctypes
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import requests

from helpers.runtime import settings
from helpers.runtime.cpu import cpu_info, cpu_list
from helpers.runtime.errors import UserError, one_line_errors
from helpers.runtime.formats import CHOICES, LOW_BIT_HELP
from helpers.runtime.paths import REPO_ROOT
from helpers.runtime.settings import child_environment
from helpers.serving.limits import no_keys_problem

LOG_DIR = REPO_ROOT / "build" / "serving"
HOST = "127.0.0.1"
# Heartbeats every 5 s, a silent worker dropped after 30 s (FastChat's defaults: 45 s, 90 s).
HEARTBEATS = {"FASTCHAT_WORKER_HEART_BEAT_INTERVAL": "5", "FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION": "30"}
RESTART_BACKOFF_S = (1, 2, 4, 8, 16, 30)  # waits before each restart of a worker that keeps failing
STABLE_S = 60  # a worker that ran this long before failing starts its back-off again from the first wait


def free_port():
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def core_groups(count, cpus=None, info=None):
    """The logical CPUs this process may use (cpus) in `count` groups of whole physical cores, hyperthread
    siblings together, in socket and core order (info: the CpuInfo that places them), as taskset -c lists them."""
    cores = list((info or cpu_info()).physical_cores_of(cpus).values())
    if not 1 <= count <= len(cores):
        raise UserError(f"--workers must be between 1 and the {len(cores)} physical cores this machine lets us use, "
                        f"not {count}.")
    size = len(cores) // count
    return [cpu_list(number for core in cores[i * size:(i + 1) * size] for number in core) for i in range(count)]


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: a forked child should not load libraries


def _die_with_parent():
    """In the child: end when the thread that started it ends (Linux's PR_SET_PDEATHSIG), so start a stack
    from the thread that lives as long as it should."""
    _PRCTL(1, signal.SIGTERM)


@dataclass
class Process:
    """One server of the stack: `[*prefix] python -m module --host host --port port *arguments` (prefix: for
    example `ip netns exec NAME`, to run it on another host's network)."""

    name: str
    module: str
    arguments: list = field(default_factory=list)
    port: int = field(default_factory=free_port)
    host: str = HOST
    prefix: list = field(default_factory=list)
    env: dict = field(default_factory=dict)  # added to this process's environment
    popen: subprocess.Popen = None
    restarts: int = 0
    started_s: float = 0.0
    restart_at_s: float = None  # when a failed process is due to start again

    @property
    def command(self):
        return [*self.prefix, sys.executable, "-m", self.module, "--host", self.host, "--port", str(self.port),
                *self.arguments]

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    @property
    def log(self):
        return LOG_DIR / f"{self.name}.log"

    def start(self):
        """Start it, its output into its log (a restart's after the earlier run's)."""
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a" if self.restarts else "w") as log:
            self.popen = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                          env=child_environment(**HEARTBEATS, LOGDIR="", **self.env),
                                          start_new_session=True, preexec_fn=_die_with_parent)
        self.started_s = time.monotonic()

    def running(self):
        return self.popen is not None and self.popen.poll() is None

    def problem(self):
        """Why this worker cannot answer (it stopped, or its /health says so), or None (also while it starts)."""
        if not self.running():
            return f"stopped (exit code {self.popen.returncode})"
        try:
            response = requests.get(self.url + "/health", timeout=2)
        except requests.RequestException:
            return None  # still loading its model, or busy: not a failure
        if response.status_code == 503:
            return f"reports itself unhealthy ({response.json()['error']['message']})"

    def check_running(self):
        if not self.running():
            lines = self.log.read_text(errors="replace").strip().splitlines()
            errors = [line for line in lines if line.startswith("Error: ")]  # a helpers error, already one line
            said = errors[-1].removeprefix("Error: ") if errors else f"the end of {self.log}:\n" + "\n".join(lines[-5:])
            raise UserError(f"The {self.name} stopped while starting. {said}")

    def stop(self, grace_s=5):
        if self.running():
            self.popen.terminate()
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


class Stack:
    """with Stack(workers=2) as stack: requests to stack.url; stack.workers[i].popen to stop one."""

    def __init__(self, port=None, workers=1, model=None, max_batch=16, max_queue=None, host=HOST, api_keys=None,
                 state_cache_mb=None, low_bit="sym_int4"):
        self.model, self.max_batch, self.max_queue, self.state_cache_mb = model, max_batch, max_queue, state_cache_mb
        self.low_bit = low_bit
        self.controller = Process("controller", "fastchat.serve.controller")
        # the keys travel in the environment, not on a command line other users can read
        self.api_server = Process("api_server", "helpers.serving.api_server", ["--controller-address", self.controller.url],
                                  port or free_port(), host, env={"RWKV_API_KEYS": api_keys or ""})
        self.workers = []
        self.planned_cores = core_groups(workers) if workers != 1 else [None]

    def add_worker(self, cores=None, deadline=None):
        """Start one more worker (pinned to `cores`, as taskset -c lists them) and return it once the
        controller has registered it: what a worker on another host does with the controller's address."""
        arguments = ["--controller-address", self.controller.url, "--max-batch", str(self.max_batch),
                     "--low-bit", self.low_bit]
        arguments += ["--max-queue", str(self.max_queue)] if self.max_queue is not None else []
        arguments += ["--state-cache-mb", str(self.state_cache_mb)] if self.state_cache_mb is not None else []
        arguments += ["--model", self.model] if self.model else []
        arguments += ["--cpus", cores] if cores else []
        worker = Process(f"worker-{len(self.workers) + 1}", "helpers.serving.worker", arguments)
        self.workers.append(worker)
        worker.start()
        running = len([w for w in self.workers if w.running()])
        self._wait(worker, deadline or time.monotonic() + 600, lambda: self.registered_workers() >= running)
        return worker

    @property
    def url(self):
        return self.api_server.url

    @property
    def processes(self):
        return [self.controller, self.api_server, *self.workers]

    def start(self, timeout_s=600):
        """Start everything, the workers one after another (the first may build the low-bit cache the
        others load), and return once every worker is registered with the controller."""
        deadline = time.monotonic() + timeout_s
        self.controller.start()
        self._wait(self.controller, deadline, lambda: requests.get(self.controller.url + "/test_connection", timeout=1))
        self.api_server.start()
        for cores in self.planned_cores:
            self.add_worker(cores, deadline)
        self._wait(self.api_server, deadline, lambda: requests.get(self.url + "/health", timeout=5).ok)
        return self

    def supervise(self, say=print):
        """Restart each worker that stopped or reports itself unhealthy, after its back-off; say what happens.
        Call it every second or so."""
        now = time.monotonic()
        for worker in self.workers:
            if worker.restart_at_s is not None:
                if now >= worker.restart_at_s:
                    worker.restart_at_s = None
                    worker.start()
                    say(f"Restarted {worker.name} (process {worker.popen.pid}); it registers once its model is loaded.")
                continue
            problem = worker.problem()
            if problem:
                if now - worker.started_s > STABLE_S:
                    worker.restarts = 0
                wait = RESTART_BACKOFF_S[min(worker.restarts, len(RESTART_BACKOFF_S) - 1)]
                worker.restarts += 1
                worker.stop()
                worker.restart_at_s = now + wait
                say(f"{worker.name} {problem}; restarting it in {wait} s (restart {worker.restarts}).")

    def registered_workers(self):
        """How many registered workers answer the controller (its status adds up their speeds, 1 each)."""
        return requests.post(self.controller.url + "/worker_get_status", timeout=10).json()["speed"]

    def _wait(self, process, deadline, ready):
        while True:
            process.check_running()
            try:
                if ready():
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise UserError(f"The {process.name} was not ready in time; see {process.log}.")
            time.sleep(0.2)

    def stop(self):
        for process in reversed(self.processes):
            process.stop()

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()


@one_line_errors
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000, help="the API server's port")
    parser.add_argument("--workers", type=int, default=1, help="workers on this machine, each on its own cores")
    parser.add_argument("--max-batch", type=int, default=16, help="requests each worker decodes together at most")
    parser.add_argument("--max-queue", type=int, help="requests waiting in each worker at most (default: --max-batch); "
                        "beyond, the API answers 429")
    parser.add_argument("--state-cache-mb", type=int, help="each worker's memory for the states of recent prompts' "
                        "prefixes (default: the worker's 256)")
    parser.add_argument("--host", default=HOST, help="the API server's address (another than loopback needs keys)")
    parser.add_argument("--low-bit", default="sym_int4", choices=CHOICES, help=LOW_BIT_HELP)
    settings.add_flags(parser, "model", "api_keys", "library", "native_build", "fused_decode", "fused_kernel", "low_bit_cache")
    args = parser.parse_args(argv)
    chosen = settings.from_flags(args)
    settings.export(chosen)  # the workers inherit them
    problem = no_keys_problem(args.host, (chosen.api_keys or "").strip(), "API_KEYS=... to make serve (--api-keys, or RWKV_API_KEYS)")
    if problem:
        sys.exit(f"Error: {problem}")  # before minutes of loading a model
    for stop_signal in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, kill: stop the stack, however started
        signal.signal(stop_signal, signal.default_int_handler)
    stack = None
    try:
        stack = Stack(args.port, args.workers, chosen.model, args.max_batch, args.max_queue, args.host, chosen.api_keys,
                      args.state_cache_mb, args.low_bit)
        print(f"Starting the controller, {args.workers} worker(s) and the API server; logs in {LOG_DIR} ...", flush=True)
        stack.start()
        model = requests.get(stack.url + "/health", timeout=10).json()["models"][0]
        key = " -H 'Authorization: Bearer YOUR_KEY'" if chosen.api_keys else ""
        print(f"Serving {model} at {stack.url}/v1 (OpenAI API). Try:\n"
              f"  curl {stack.url}/v1/completions{key} -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{model}\", \"prompt\": \"Question: What is AI?\\n\\nAnswer:\", \"max_tokens\": 40}}'\n"
              "Ctrl-C stops the stack.", flush=True)
        while stack.api_server.running() and stack.controller.running():
            stack.supervise(lambda line: print(line, flush=True))
            time.sleep(1)
        print("The API server or the controller stopped; stopping the rest.")
    except UserError as error:
        sys.exit(f"Error: {error}")
    except KeyboardInterrupt:
        print("\nStopping.")
    finally:
        if stack:
            stack.stop()


if __name__ == "__main__":
    main()
