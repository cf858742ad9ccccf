"""The project's error classes and the out-of-memory check: a leaf module, importable by every other one.

A stage or ``transferlab`` command that fails with one of these prints one clear line and exits with code 2
(:func:`transferlab.entrypoint.run_stage`).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A param in params.yaml is missing, misspelt, mistyped or out of range."""


class DatasetError(RuntimeError):
    """The dataset could not be found, fetched or read."""


class ModelError(ValueError):
    """An unknown architecture, a weights file that does not fit it, or a file that is not a usable
    checkpoint."""


class DivergedError(RuntimeError):
    """Training diverged: the loss became infinite or NaN."""


class UnlearnedError(RuntimeError):
    """Training ended with a model that did not learn: at chance, or with weights or outputs not finite."""


# what torch's CPU allocator and CUDA / MPS say when an allocation fails
# (torch.OutOfMemoryError is a RuntimeError)
OUT_OF_MEMORY_MESSAGES = ("can't allocate memory", "out of memory", "std::bad_alloc")


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, MemoryError) or (
        isinstance(err, RuntimeError) and any(m in str(err) for m in OUT_OF_MEMORY_MESSAGES)
    )
