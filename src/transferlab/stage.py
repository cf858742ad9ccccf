"""The common entry point of the pipeline stages."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from .config import ConfigError
from .dataset import DatasetError
from .models import ModelError

# what torch's CPU allocator and CUDA / MPS say when an allocation fails (torch.OutOfMemoryError is a RuntimeError)
OUT_OF_MEMORY_MESSAGES = ("can't allocate memory", "out of memory", "std::bad_alloc")


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and any(m in str(err) for m in OUT_OF_MEMORY_MESSAGES))


def run_stage(name: str, main: Callable[[], object], batch_setting: Callable[[], tuple[str, int]] | None = None) -> None:
    """Run a stage with logging on; a known failure (bad params, data or model) is one clear line and exit code 2.

    ``batch_setting`` gives the batch size that sets the stage's memory use (a params key or a command-line
    option, and its value): running out of memory is then a message that suggests a smaller one.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (ConfigError, DatasetError, ModelError) as err:
        print(f"{name}: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        if batch_setting is None or not is_out_of_memory(err):
            raise
        key, value = batch_setting()
        option = key.startswith("--")
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        advice = (
            f"Set a smaller {key} {'on the command line' if option else 'in params.yaml'} ({value // 2}, say) and run again"
            if value > 1 else "One image at a time is already too much: use smaller images or a device with more memory"
        )
        print(f"{name}: out of memory with {key}{' ' if option else ': '}{value} ({reason}). {advice}", file=sys.stderr)
        sys.exit(2)
