"""What the notebooks share: plumbing (tables, measuring, plots, widgets) and the CLIs, over helpers.runtime
(kernel choice, CPU repair, fused decoding step, loaders, low-bit cache), which the lessons call by name.

Importing helpers first chooses bigdl-llm's native kernel library for this CPU (see helpers.runtime.cpu),
which has to happen before bigdl.llm is imported.
"""
from helpers.runtime.cpu import select_native_library

NATIVE_LIBRARY = select_native_library()
