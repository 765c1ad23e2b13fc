"""What a process does once, before it loads a model: chooses the low-bit library's native kernel library for
this CPU (which must happen before the library is imported), sets the variables the library reads on import,
keeps its INFO logging off, and checks the versions of the libraries helpers patches. The notebooks' setup(),
every tool, the serving worker and the loaders call start() first; importing a module does none of it.
"""
import logging
import warnings

from helpers.runtime import library
from helpers.runtime import settings as settings_module
from helpers.runtime.cpu import select_native_library
from helpers.runtime.versions import warn_about_versions

_native_choice = None


def start(settings=None):
    """Choose the native library (once per process) by settings (default: the environment's), and warn on
    stderr about versions other than the tested ones. Returns the NativeChoice."""
    global _native_choice
    if _native_choice is None:
        # bigdl-llm and ipex-llm call logging.basicConfig(level=INFO) on import, which prints a timestamped line
        # for every conversion; configured first, that call does nothing.
        logging.basicConfig(format="%(asctime)s - %(levelname)s - %(message)s", level=logging.WARNING)
        # ipex-llm imports transformers.deepspeed, which warns on import in transformers 4.37 that it moved.
        warnings.filterwarnings("ignore", message="transformers.deepspeed module is deprecated", category=FutureWarning)
        settings = settings or settings_module.read()
        settings_module.export(settings)
        settings_module.set_variables(library.import_variables())
        _native_choice = select_native_library(settings.native_build, settings.native_library,
                                               settings.chosen_native_library)
        warn_about_versions(["transformers", library.name()], library.name())
    return _native_choice
