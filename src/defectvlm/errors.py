"""Errors a user can act on; the CLI prints their message, never a traceback."""


class StepFailure(RuntimeError):
    """A step ran into a hard rule (missing input, too many rejects); the message says which."""
