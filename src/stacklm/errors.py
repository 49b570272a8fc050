"""Errors that stacklm reports to the user as one line instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: a config key or value, a path, a data file, a request.

    The CLI prints the message on one line and exits with code 2.
    """


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss stayed non-finite); the last checkpoint is intact.

    The CLI prints the message on one line and exits with code 1.
    """
