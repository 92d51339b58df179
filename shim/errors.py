"""Error kinds of the shim's domain. The task service maps them to ttrpc status codes in
one place; below it nothing knows about status codes."""


class ShimError(Exception):
    """Something failed that is nobody's mistake in particular (reported as Unknown)."""


class NotFound(ShimError):
    """No such container, process or cgroup, or the process has already finished."""


class AlreadyExists(ShimError):
    pass


class FailedPrecondition(ShimError):
    """The operation is not allowed in the process's current state."""


class InvalidArgument(ShimError):
    pass


class Unavailable(ShimError):
    """A dependency (CRIU, the OCI runtime) is missing or unusable on this host."""


class Interrupted(ShimError):
    """The process doing the work (CRIU, a checkpoint worker) died before it finished: what it had begun on the task
    was not undone by it, so the task's fate must be looked at rather than assumed."""
