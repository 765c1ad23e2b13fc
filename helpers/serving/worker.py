"""A FastChat model worker for RWKV-4 in low bits on the CPU.

    python -m helpers.serving.worker --controller-address http://127.0.0.1:21001 --port 21002 [--model PATH_OR_ID]
        [--cpus 0-7] [--max-batch 16] [--max-queue 16] [--queue-timeout-s 30] [--state-cache-mb 256]
        [--host 10.0.0.2 --worker-address http://10.0.0.2:21002]      (another host, on a private network)

It loads the model as the notebooks do (helpers.runtime: the low-bit cache, the CPU repair, the fused
decoding step), batches the requests it is sent (helpers.serving.scheduler: prompts read in chunks
between steps, from the state of a cached prefix where one begins them), streams text with stop strings,
and registers with the controller once it can answer. `--cpus` pins it to those cores (one
worker per socket or NUMA node on a server); it runs a thread on each physical core among them.

It checks every request itself (a worker's port takes raw generate calls): the prompt, max_tokens and the
prompt's length against the context, and the sampling values. Past `--max-batch` running and `--max-queue`
waiting requests it refuses with ENGINE_OVERLOADED (the API server answers 429); a request whose client
goes stops decoding before the next step. `/health` answers 200 while it can answer, 503 once its model
thread has failed.
"""
import argparse
import ctypes
import os
import socket
import sys
import threading
import time

import requests

from helpers.runtime import settings
from helpers.runtime.cpu import cpu_info
from helpers.runtime.errors import UserError
from helpers.runtime.formats import CHOICES, LOW_BIT_HELP
from helpers.runtime.startup import start
from helpers.runtime.versions import warn_about_versions
from helpers.serving.state_cache import STATE_CACHE_MB

WILDCARDS = ("0.0.0.0", "::", "")
M_MMAP_THRESHOLD, MMAP_FROM_BYTES = -3, 128 * 1024  # glibc's mallopt parameter, and its default value


def parse_cpus(text):
    """{0, 1, 2, 3, 8} from "0-3,8", as taskset -c writes core lists."""
    try:
        cpus = set()
        for part in text.split(","):
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise UserError(f"--cpus takes core numbers such as 0-7 or 0,2,4, not {text!r}.") from None
    unknown = cpus - os.sched_getaffinity(0)
    if unknown or not cpus:
        raise UserError(f"--cpus {text}: this machine lets the worker use cores {sorted(os.sched_getaffinity(0))} only.")
    return cpus


def _register_when_listening(worker, host, port):
    """Register with the controller once this worker's server accepts connections (the controller drops
    a worker it cannot reach), retrying until the controller answers; then send heartbeats."""
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    while True:
        try:
            return worker.init_heart_beat()
        except requests.RequestException as error:
            print(f"The controller at {worker.controller_addr} does not answer ({error}); retrying in 5 s")
            time.sleep(5)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--controller-address", default="http://127.0.0.1:21001")
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address to listen on: this host's address on a private network for other hosts")
    parser.add_argument("--port", type=int, default=21002)
    parser.add_argument("--worker-address", help="how the controller reaches this worker (default: http://HOST:PORT)")
    parser.add_argument("--model-name", help="the name clients ask for (default: the model folder's name)")
    parser.add_argument("--low-bit", default="sym_int4", choices=CHOICES, help=LOW_BIT_HELP)
    parser.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most")
    parser.add_argument("--max-queue", type=int, help="requests waiting for a place at most (default: --max-batch); "
                        "more are refused (the API answers 429)")
    parser.add_argument("--queue-timeout-s", type=float,
                        help="a request that waited this long for a place is refused (default: the scheduler's 30 s)")
    parser.add_argument("--state-cache-mb", type=int, default=STATE_CACHE_MB,
                        help="memory for the states of recent prompts' prefixes, reused by the requests that begin "
                             "with them (0: none)")
    parser.add_argument("--cpus", help="cores to run on, as taskset -c takes them (0-7)")
    settings.add_flags(parser, "model", "library", "native_build", "fused_decode", "fused_kernel", "low_bit_cache")
    args = parser.parse_args(argv)
    if args.host in WILDCARDS:
        parser.exit(2, f"Error: --host {args.host!r} listens on every network, public ones too, and a worker takes "
                       "raw generate calls: name this host's address on a private network (see the README).\n")
    if (args.max_batch < 1 or (args.max_queue or 0) < 0 or args.state_cache_mb < 0
            or (args.queue_timeout_s is not None and args.queue_timeout_s <= 0)):
        parser.exit(2, "Error: --max-batch must be at least 1, --max-queue and --state-cache-mb at least 0 and "
                       "--queue-timeout-s above 0.\n")
    warn_about_versions(["fschat"])
    # Every allocation of 128 KiB or more gets pages of its own, returned on free: glibc otherwise raises that
    # bound after the first frees, and the kernel's buffers (megabytes each call) come from the heap, where the
    # small states the cache keeps end up between them and the heap only grows (+254% RSS over a soak).
    ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_FROM_BYTES)
    try:
        if args.cpus:
            os.sched_setaffinity(0, parse_cpus(args.cpus))  # before torch starts its threads
        start(settings.from_flags(args))  # chooses the library's native kernels, before the library is imported
        import torch
        import uvicorn

        from helpers.runtime.models import resolve_model
        from helpers.serving.rwkv_worker import RwkvWorker, install_routes  # first: FastChat logs to stdout
        from fastchat.serve import base_model_worker

        torch.set_num_threads(len(cpu_info().physical_cores_of(os.sched_getaffinity(0))))  # a thread a core
        source = resolve_model(args.model)
        worker = RwkvWorker(
            source, args.model_name or source.name.split("--")[-1], args.low_bit, args.max_batch, args.max_queue,
            **({"queue_timeout_s": args.queue_timeout_s} if args.queue_timeout_s else {}),
            state_cache_mb=args.state_cache_mb, controller_addr=args.controller_address, worker_addr=args.worker_address or f"http://{args.host}:{args.port}")
    except UserError as error:
        sys.exit(f"Error: {error}")
    install_routes(base_model_worker.app, worker)
    threading.Thread(target=_register_when_listening, args=(worker, args.host, args.port), daemon=True).start()
    uvicorn.run(base_model_worker.app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
