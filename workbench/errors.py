"""The one exception type for failures a user can cause and fix."""


class WorkbenchError(Exception):
    """A user-facing error: the message names the thing that is wrong and how to fix it.

    The CLI prints it on one line without a traceback and exits with status 2. Internal bugs raise
    anything else and keep their tracebacks.
    """
