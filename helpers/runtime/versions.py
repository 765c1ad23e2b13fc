"""The versions of the libraries whose internals helpers patches or calls, as pinned, and one check at
start-up that names the pinned version and the one found when they differ, and what may break."""
import sys
from importlib import metadata

PINNED = {  # distribution: (pinned version, what depends on its internals)
    "transformers": ("4.31.0", "helpers.runtime.rwkv_cpu replaces the RWKV model's forwards by their attribute "
                     "names and positional arguments, so decoding may fail or compute other logits"),
    "bigdl-llm": ("2.5.0b20240627", "helpers.runtime.tensor_loading and rwkv_cpu call bigdl-llm's private low-bit "
                  "functions and read its block layouts, so loading or the fused step may fail"),
    "fschat": ("0.2.36", "helpers.serving replaces FastChat's API routes and module globals, so the API server or "
               "the worker may refuse requests or stream wrongly"),
}


def version_problems(distributions):
    """One line for each installed distribution named whose version is not the pinned one."""
    problems = []
    for name in distributions:
        pinned, at_risk = PINNED[name]
        try:
            found = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if found != pinned:
            problems.append(f"warning: {name} {found} is installed, helpers is tested with {pinned}: {at_risk}; "
                            f"`pip install {name}=={pinned}` restores it.")
    return problems


def warn_about_versions(distributions):
    """Print version_problems(distributions) on stderr."""
    for line in version_problems(distributions):
        print(line, file=sys.stderr)
