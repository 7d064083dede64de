"""The error users see for bad input: one line naming the problem and what to do."""


class SeganyError(ValueError):
    """Bad input from a user (file, prompt, checkpoint, option).

    The CLI prints the message on one line and exits with code 2; API callers
    can catch it as a ``ValueError``.
    """
