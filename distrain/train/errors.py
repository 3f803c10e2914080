"""The errors of a training run: one type for "it cannot start or did not finish", with a subtype for preflight."""


class TrainingError(RuntimeError):
    """A run that cannot start or did not finish, with the reason and what to do."""


class PreflightError(TrainingError):
    """A run that cannot start: found on the driver before any worker starts."""
