"""Everything the notebooks use that is not the lesson itself.

Importing helpers first chooses bigdl-llm's native kernel library for this CPU (see helpers.cpu),
which has to happen before bigdl.llm is imported.
"""
from helpers.cpu import select_native_library

NATIVE_LIBRARY = select_native_library()
