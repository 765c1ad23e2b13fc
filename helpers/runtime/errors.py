"""The one exception type a user sees: a problem they can fix, with a message that says how."""


class UserError(Exception):
    """Bad input or an unsuitable machine. The message is shown as is, without a traceback."""
