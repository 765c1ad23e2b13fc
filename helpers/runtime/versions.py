"""The versions of the libraries whose internals helpers patches or calls, as tested with each low-bit library,
and one check at start-up that names the tested version and the one found when they differ, and what may break."""
import sys
from importlib import metadata

TESTED = {  # low-bit library: {distribution: the version tested with it}
    "bigdl-llm": {"bigdl-llm": "2.5.0b20240627", "transformers": "4.31.0", "fschat": "0.2.36"},
    "ipex-llm": {"ipex-llm": "2.2.0", "transformers": "4.37.0", "fschat": "0.2.36"},
}
REQUIREMENTS = {"bigdl-llm": "requirements.txt", "ipex-llm": "requirements-ipex-llm.txt"}  # what `make install` reads
ENVIRONMENTS = {"bigdl-llm": ".venv", "ipex-llm": ".venv-ipex-llm"}  # and the virtual environment it makes
AT_RISK = {  # distribution: what depends on its internals
    "transformers": "helpers.runtime.rwkv_cpu replaces the RWKV model's forwards by their attribute names and "
                    "positional arguments, so decoding may fail or compute other logits",
    "bigdl-llm": "helpers.runtime.tensor_loading and rwkv_cpu call the library's private low-bit functions and read "
                 "its block layouts, so loading or the fused step may fail",
    "fschat": "helpers.serving replaces FastChat's API routes and module globals, so the API server or the worker "
              "may refuse requests or stream wrongly",
}
AT_RISK["ipex-llm"] = AT_RISK["bigdl-llm"]


def version_problems(distributions, library="bigdl-llm"):
    """One line for each installed distribution named whose version is not the one tested with `library`."""
    problems = []
    for name in distributions:
        tested = TESTED[library][name]
        try:
            found = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if found != tested:
            problems.append(f"warning: {name} {found} is installed, helpers is tested with {tested} (with {library}): "
                            f"{AT_RISK[name]}; `pip install {name}=={tested}` restores it.")
    return problems


def warn_about_versions(distributions, library="bigdl-llm"):
    """Print version_problems(distributions, library) on stderr."""
    for line in version_problems(distributions, library):
        print(line, file=sys.stderr)
