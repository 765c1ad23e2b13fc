"""What a process does once, before it loads a model: chooses bigdl-llm's native kernel library for this
CPU (which must happen before bigdl.llm is imported), keeps bigdl-llm's INFO logging off, and checks the
versions of the libraries helpers patches. The notebooks' setup(), every tool, the serving worker and the
loaders call start() first; importing a module does none of it.
"""
import logging

from helpers.runtime import settings as settings_module
from helpers.runtime.cpu import select_native_library
from helpers.runtime.versions import warn_about_versions

_native_choice = None


def start(settings=None):
    """Choose the native library (once per process) by settings (default: the environment's), and warn on
    stderr about versions other than the pinned ones. Returns the NativeChoice."""
    global _native_choice
    if _native_choice is None:
        # bigdl-llm calls logging.basicConfig(level=INFO) on import, which prints a timestamped line for every
        # conversion; configured first, that call does nothing.
        logging.basicConfig(format="%(asctime)s - %(levelname)s - %(message)s", level=logging.WARNING)
        settings = settings or settings_module.read()
        settings_module.export(settings)
        _native_choice = select_native_library(settings.native_build, settings.native_library,
                                               settings.chosen_native_library)
        warn_about_versions(["transformers", "bigdl-llm"])
    return _native_choice
