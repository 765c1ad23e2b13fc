"""Notebook conveniences: the runtime started first, and helpers' errors as one clear line."""
from helpers.runtime.errors import UserError
from helpers.runtime.startup import start


def _show_user_error(shell, etype, value, tb, tb_offset=None):
    print(f"error: {value}")


def setup():
    """Call once at the top of a notebook, before anything loads a model: chooses bigdl-llm's native library
    for this CPU (helpers.runtime.startup) and makes helpers' errors show as one line."""
    from IPython import get_ipython

    shell = get_ipython()
    if shell is not None:  # first, so that a bad setting start() refuses shows as its one line too
        shell.set_custom_exc((UserError,), _show_user_error)
    start()


class clear_errors:
    """`with clear_errors():` shows a helpers error as its one line and lets the notebook go on."""

    def __enter__(self):
        return self

    def __exit__(self, etype, value, tb):
        if etype is not None and issubclass(etype, UserError):
            print(f"error: {value}")
            return True
        return False


def show_markdown(text):
    """Show Markdown rendered (a table as a table) in JupyterLab and Voila; its source is the text output."""
    from IPython.display import Markdown, display

    display(Markdown(text))


def show_table(rows, headers):
    """Show rows as a table: rendered in JupyterLab, a GitHub-style text table in the notebook file."""
    from helpers.measure.reports import markdown

    show_markdown(markdown(headers, rows))


def low_bit_folder(source, low_bit="sym_int4"):
    """The folder save_low_bit wrote for the model (notebook 02's low-bit cache, the tokenizer's files beside
    the weights), as a string for load_low_bit; converted and saved the first time."""
    from helpers.runtime.loading import ensure_cache

    return str(ensure_cache(source, low_bit))
