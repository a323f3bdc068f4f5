"""One error type for every bad input, so stages can print it as one clear line."""


class GemvlabError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""
