"""The code the notebooks share, in layers that import only downward:

- runtime/: what the lessons call by name: settings, CPU facts and the native library's choice (startup),
  model resolution, the prompt format, the tokenizer, the loaders, the CPU repair, the fused decoding step;
- serving/: the OpenAI-compatible API over the runtime, with FastChat;
- measure/: measuring code the tools and the lessons share: timed decoding, read bandwidth, provenance,
  measurements in processes of their own;
- tools/: the command-line tools (generate, checkpoint, train, perplexity, bench, build kernels, kernel sweep,
  load test, prompt benchmark) and the code only they use;
- lessons/: the notebooks' plumbing: tables, plots, widgets, tuning, the environment report.

Importing a module does no work: the notebooks' setup() and every tool call helpers.runtime.startup.start()
first, which chooses the low-bit library's native kernels before the library (bigdl.llm or ipex_llm)
is imported (the loaders call it too, and import the library only then, through helpers.runtime.library).
tests/test_layers.py holds the order.
"""
