"""The common entry point of the pipeline stages."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from .config import ConfigError, Params, load_params
from .dataset import DatasetError
from .models import ModelError

# what torch's CPU allocator and CUDA / MPS say when an allocation fails (torch.OutOfMemoryError is a RuntimeError)
OUT_OF_MEMORY_MESSAGES = ("can't allocate memory", "out of memory")


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and any(m in str(err) for m in OUT_OF_MEMORY_MESSAGES))


def run_stage(name: str, main: Callable[[], object], batch_param: Callable[[Params], tuple[str, int]] | None = None) -> None:
    """Run a stage with logging on; a known failure (bad params, data or model) is one clear line and exit code 2.

    ``batch_param`` names the batch size that sets the stage's memory use (key, value): running out of
    memory is then a message that suggests a smaller one.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (ConfigError, DatasetError, ModelError) as err:
        print(f"{name}: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        if batch_param is None or not is_out_of_memory(err):
            raise
        key, value = batch_param(load_params())
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        print(
            f"{name}: out of memory with {key}: {value} ({reason}). Set a smaller {key} in params.yaml "
            f"({max(1, value // 2)}, say) and run again",
            file=sys.stderr,
        )
        sys.exit(2)
