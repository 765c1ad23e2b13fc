"""Notebook conveniences: helpers' errors as one clear line, and quiet library chatter."""
from helpers.errors import UserError


def _show_user_error(shell, etype, value, tb, tb_offset=None):
    print(f"error: {value}")


def setup():
    """Call once at the top of a notebook."""
    from IPython import get_ipython

    shell = get_ipython()
    if shell is not None:
        shell.set_custom_exc((UserError,), _show_user_error)


class clear_errors:
    """`with clear_errors():` shows a helpers error as its one line and lets the notebook go on."""

    def __enter__(self):
        return self

    def __exit__(self, etype, value, tb):
        if etype is not None and issubclass(etype, UserError):
            print(f"error: {value}")
            return True
        return False


def show_table(rows, headers):
    """Print rows as a GitHub-style text table (readable on GitHub and compared by nbval)."""
    from tabulate import tabulate

    print(tabulate(rows, headers, tablefmt="github", disable_numparse=True))
