"""The one exception type a user sees: a problem they can fix, with a message that says how."""
import functools
import sys


class UserError(Exception):
    """Bad input or an unsuitable machine. The message is shown as is, without a traceback."""


def one_line_errors(main):
    """A command-line program's main(), which ends with 'Error: ...' on stderr (exit status 1) on a UserError."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            sys.exit(f"Error: {error}")
    return run
