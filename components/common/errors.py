"""One small hierarchy of errors, so callers can tell bad input from broken code."""


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""


class ConfigError(PipelineError):
    """A configuration key or value is unknown or out of range."""


class DataValidationError(PipelineError):
    """The dataset as a whole cannot be used (missing folder, one class, too many bad files...)."""


class BackboneError(PipelineError):
    """A backbone name is unknown or its weights cannot be loaded."""


class ExportParityError(PipelineError):
    """The exported ONNX model disagrees with the PyTorch model it came from."""
