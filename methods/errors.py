"""The methods layer's one error type, in its own module so that backbones and blocks need not import base."""


class MethodError(ValueError):
    """Bad method name, hyperparameter, or input batch."""
