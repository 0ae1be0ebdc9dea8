"""The one exception type for mistakes a user can make (bad config, missing data, foreign files).

The CLI turns it into a one-line message and exit code 2, before any training starts.
"""


class UserError(ValueError):
    """A user-caused error; the message names the culprit (config key, path or name) in one line."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type when empty), for one-line reports."""
    line = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return line[:limit]
