"""The one exception type for expected failures.

Anything a user can fix (bad input, a missing file, an API refusal) is raised as
``UserError`` with a message that says what is wrong and how to fix it. The shared
``main()`` wrapper in ``datagen.common.cli`` prints it as one line and exits with 1; any
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An expected error: printed as one line on stderr, exit code 1."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (a library's long message in one line)."""
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else type(exc).__name__
