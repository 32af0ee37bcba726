"""One exception type for bad user input, so the CLI can print it without a traceback."""


class EvomergeError(Exception):
    """A problem with the user's input (models, config, data) explained in one message."""


class EvomergeWarning(UserWarning):
    """Suspicious input that does not stop a run (NaN weights, duplicate item ids, ...)."""
