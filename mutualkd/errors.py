"""The one exception type for mistakes a user can make (bad config, missing data, foreign files).

The CLI turns it into a one-line message and exit code 2, before any training starts.
"""


class UserError(ValueError):
    """A user-caused error; the message names the culprit (config key, path or name) in one line."""
