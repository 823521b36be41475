"""One small hierarchy of errors, so callers can tell bad input from broken code.

Every ``PipelineError`` is the user's to fix (data, layout, configuration, a model reference): the
CLI prints its message and exits with status 2, without a traceback. Anything else is a bug.
"""


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""


class ConfigError(PipelineError):
    """A configuration key or value is unknown or out of range, or the file cannot be read."""


class DataValidationError(PipelineError):
    """The dataset as a whole cannot be used (missing folder, one class, too many bad files...)."""


class LayoutError(DataValidationError):
    """The folder's layout is ambiguous or not one the pipeline understands; never guessed at."""


class BackboneError(PipelineError):
    """A backbone name is unknown or its weights cannot be loaded."""


class ModelUriError(PipelineError):
    """A registered-model URI is malformed or names no model in the tracking store."""


class ExportParityError(PipelineError):
    """The exported ONNX model disagrees with the PyTorch model it came from."""
