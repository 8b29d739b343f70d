"""Typed errors the engine raises; callers map them to CLI exits or gRPC statuses."""


class MiniInferError(Exception):
    """Base class for every error MiniInfer raises on purpose."""


class InvalidRequest(MiniInferError, ValueError):
    """A request field is out of range; the message names the field."""


class ModelNotFound(MiniInferError, FileNotFoundError):
    """The model name is neither a known alias nor a readable checkpoint."""


class OutOfPages(MiniInferError, RuntimeError):
    """The KV page pool cannot satisfy an allocation."""


class UnsupportedModel(MiniInferError, ValueError):
    """The checkpoint's architecture or a setting in it is not implemented."""
