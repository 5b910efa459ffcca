"""The project's one exception for bad input, importable by any module without side effects."""


class UserError(Exception):
    """Bad input; the message is one line that says what to do."""
