"""The one error type slimtorch raises for user-facing problems, and how values appear in its messages."""


class SlimError(Exception):
    """A problem the user can act on.

    The message is one line: what was wrong and what to do about it. The CLI prints it
    as-is and exits with status 2.
    """


def shown(value, limit: int = 80) -> str:
    """``repr(value)`` for a message, cut to ``limit`` characters and to one line.

    User values (a recipe field, a file's header) can be arbitrarily large or deep: a message must never
    format them whole. Containers are summarised by type and size without walking them.
    """
    if isinstance(value, dict | list | tuple | set):
        return f"a {type(value).__name__} of {len(value)} items"
    if isinstance(value, BaseException):
        text = str(value)
    elif isinstance(value, str):
        text = repr(value[:limit + 1])
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**18:
        return f"an integer of {len(str(abs(value))) if abs(value) < 10**4000 else 'over 4000'} digits"
    else:
        text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
