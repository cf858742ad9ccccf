"""The common entry point of the pipeline stages."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from .config import ConfigError
from .dataset import DatasetError
from .models import ModelError


def run_stage(name: str, main: Callable[[], object]) -> None:
    """Run a stage with logging on; a known failure (bad params, data or model) is one clear line and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (ConfigError, DatasetError, ModelError) as err:
        print(f"{name}: {err}", file=sys.stderr)
        sys.exit(2)
