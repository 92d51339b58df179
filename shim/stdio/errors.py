"""The one exception type of the stdio layer: something a caller (or the user) can act on."""


class StdioError(Exception):
    """A process's stdio could not be set up or used; the message names the stream and the path."""
