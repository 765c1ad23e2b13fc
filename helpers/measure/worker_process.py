"""A measurement in a process of its own, so that one configuration's threads, kernels and memory cannot
touch another's. The worker is a module run with `python -m`; it answers with one JSON object per line on
stdout (other lines, a library's chatter, are skipped), and a line on its stdin asks for another answer.
"""
import json
import subprocess
import sys
import tempfile

from helpers.runtime.settings import child_environment


class WorkerProcess:
    def __init__(self, module, args=(), threads=None, env=None, prefix=(), python=sys.executable):
        """Start `python -m module args` (after `prefix`, e.g. numactl's), with env added to this process's
        environment and OMP_NUM_THREADS=threads when given; python: another environment's interpreter."""
        self.command = [*prefix, str(python), "-m", module, *args]
        self.errors = tempfile.TemporaryFile("w+")
        threads_env = {"OMP_NUM_THREADS": threads} if threads else {}
        self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors,
                                        text=True, env=child_environment(**(env or {}), **threads_env))

    def read(self):
        """The worker's next answer; RuntimeError with the end of its stderr when it stopped first."""
        for line in self.process.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self.process.wait()
        self.errors.seek(0)
        raise RuntimeError(f"{' '.join(self.command)} failed:\n{self.errors.read()[-3000:]}")

    def ask(self, request="measure"):
        self.process.stdin.write(request + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self):
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait()
        self.errors.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
