"""Error types the CLI turns into one-line messages and exit code 2."""


class UserInputError(ValueError):
    """Bad input from the user: a spec field, a path, a resource that cannot be reached.

    The message names the field or resource and fits on one line.
    """


class SpecError(UserInputError):
    """A run or sweep spec failed validation."""


class ResourceError(UserInputError):
    """Weights, data or storage named by the spec cannot be reached."""


class NotReadyError(RuntimeError):
    """What was asked of a sweep does not exist yet (no trial has finished a student): not bad
    input, and asked again later it may (the CLI: one line, exit 1)."""


class TrainingDivergedError(RuntimeError):
    """A run's loss went NaN or infinite: nothing of that epoch is kept (the CLI: one line, exit 1)."""


class RecordedDivergence(TrainingDivergedError):
    """A divergence kept for its key in storage (registry.record_divergence), now or before: a
    retry of the run could only meet it again, so a sweep's Train run ends without one."""
