"""The error type of distrain.models (bad backbone names, weights, depths); its message names the culprit."""


class ModelError(ValueError):
    """A backbone, weights file or unfreeze depth that cannot be used; the message says what is valid."""
