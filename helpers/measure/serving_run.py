"""The set-up every serving measurement shares (helpers.tools.load_test, helpers.tools.prompt_bench): the model
and its tokenizer, the serving stack on it, and the read bandwidth before and after, for the run's provenance."""
import contextlib
from dataclasses import dataclass, field

import psutil
import requests

from helpers.measure import provenance
from helpers.measure.bandwidth import read_bandwidth_gbs
from helpers.runtime.loading import load_tokenizer
from helpers.runtime.models import resolve_model
from helpers.serving.stack import Stack


@dataclass
class ServingRun:
    source: object  # the resolved model
    tokenizer: object
    threads: int  # the machine's physical cores, which the worker runs on
    bandwidths: list = field(default_factory=list)  # GB/s read before the stack started, then after it stopped
    stack: Stack = None
    model: str = ""  # the name the server serves the model under

    def stamp(self, command):
        """The run's provenance: machine, date, the serving code's fingerprint, threads, bandwidths."""
        return provenance.stamp("serving", command, self.threads, self.bandwidths)


@contextlib.contextmanager
def serving_run(model, **stack_options):
    """A ServingRun whose Stack (one worker, stack_options) serves `model`, a path or hub id."""
    source = resolve_model(model)
    threads = psutil.cpu_count(logical=False) or 1
    run = ServingRun(source, load_tokenizer(source), threads, [read_bandwidth_gbs(threads)])
    with Stack(model=source.location, **stack_options) as stack:
        run.stack, run.model = stack, requests.get(stack.url + "/health", timeout=10).json()["models"][0]
        yield run
    run.bandwidths.append(read_bandwidth_gbs(threads))
