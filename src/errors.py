"""The one error type the library raises for bad input."""


class UserError(Exception):
    """Bad input from the user. The message is one line that says what to do."""
