"""The common entry point of the pipeline stages and ``transferlab`` commands.

It imports no heavy library, and neither do the stage modules at their top: a stage checks its params
and says what it is about to do within a second or two, then imports torch and the model libraries
(several seconds on a small CPU) where they are used.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from .errors import ConfigError, DatasetError, DivergedError, ModelError, is_out_of_memory


def run_stage(
    name: str, main: Callable[[], object], batch_setting: Callable[[], tuple[str, int]] | None = None
) -> None:
    """Run a stage with logging on; a known failure (bad params, data or model) is one clear line and exit
    code 2.

    ``batch_setting`` gives the batch size that sets the stage's memory use (a params key or a command-line
    option, and its value): running out of memory is then a message that suggests a smaller one.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (ConfigError, DatasetError, DivergedError, ModelError) as err:
        print(f"{name}: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        if batch_setting is None or not is_out_of_memory(err):
            raise
        key, value = batch_setting()
        option = key.startswith("--")
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        advice = (
            f"Set a smaller {key} {'on the command line' if option else 'in params.yaml'} "
            f"({value // 2}, say) and run again"
            if value > 1
            else "One image at a time is already too much: use smaller images or a device with more memory"
        )
        print(
            f"{name}: out of memory with {key}{' ' if option else ': '}{value} ({reason}). {advice}",
            file=sys.stderr,
        )
        sys.exit(2)
