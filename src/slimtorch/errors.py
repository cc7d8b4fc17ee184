"""The one error type slimtorch raises for user-facing problems."""


class SlimError(Exception):
    """A problem the user can act on.

    The message is one line: what was wrong and what to do about it. The CLI prints it
    as-is and exits with status 2.
    """
