"""One exception type for user-facing problems, so the CLI can print it without a traceback."""


class EvomergeError(Exception):
    """A problem with the user's input (models, config, data) explained in one message."""


class MachineError(EvomergeError):
    """The machine refused a write (disk full, read-only folder, permission denied), named in one line.

    Unlike bad input it stops a search (the next trial would hit the same wall); what was
    written before stays, so the run resumes once the cause is fixed.
    """


class EvomergeWarning(UserWarning):
    """Suspicious input that does not stop a run (NaN weights, duplicate item ids, ...)."""
