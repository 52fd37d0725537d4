"""Errors that are the user's to fix: a bad file, a wrong checkpoint, a bad flag.

The command line prints them as one line and exits with code 2, without a traceback.
"""


class UserError(Exception):
    """Something the user can fix; the message says what, where and what to do."""

    exit_code = 2


class Interrupted(UserError):
    """Ctrl-C (or SIGTERM) stopped work that cleaned up after itself; the message says what is left.
    Exit code 130, as a shell gives a command stopped by Ctrl-C."""

    exit_code = 130


class DataError(UserError):
    """A record in a data file is malformed. Carries the file and line for the message."""

    def __init__(self, path, line, problem):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {problem}")


class CheckpointError(UserError):
    """A checkpoint does not fit the model it is loaded into, or cannot be read safely."""
