"""The common entry point of the pipeline stages and ``transferlab`` commands.

It imports no heavy library, and neither do the stage modules at their top: a stage checks its params
and says what it is about to do within a second or two, then imports torch and the model libraries
(several seconds on a small CPU) where they are used.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from .errors import ConfigError, DatasetError, DivergedError, ModelError, UnlearnedError, is_out_of_memory


def run_stage(
    name: str, main: Callable[[], object], batch_setting: Callable[[], tuple[str, int]] | None = None
) -> None:
    """Run a stage with logging on; a known failure (bad params, data or model) is one clear line and exit
    code 2.

    ``batch_setting`` gives the batch size that sets the stage's memory use (a params key or a command-line
    option, and its value): running out of memory is then a message that suggests a smaller one.
    """
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(sys.modules[main.__module__].__doc__.strip())
        sys.exit(0)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (ConfigError, DivergedError, UnlearnedError) as err:  # after DVC removed the stage's outputs
        print(f"{name}: {err}{restore_hint(isinstance(err, ConfigError))}", file=sys.stderr)
        sys.exit(2)
    except (DatasetError, ModelError) as err:
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


def restore_hint(bad_param: bool) -> str:
    """What a failed stage cost when DVC ran it in the workspace, and the command that undoes it: DVC removes
    a stage's outputs (its models, and its metrics even where git tracks them) before running it, and
    ``dvc exp run -S`` has written its values into params.yaml. A queued or ``--temp`` experiment runs in a
    copy (its working folder is under .dvc/tmp/exps; DVC_ROOT names the workspace there too) and leaves the
    workspace as it was."""
    in_copy = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}" in os.getcwd()
    if not os.environ.get("DVC_STAGE") or in_copy:
        return ""
    restored, command = (
        ("params, results and models", "git checkout params.yaml metrics && dvc checkout")
        if bad_param
        else ("results and models", "git checkout metrics && dvc checkout")
    )
    return (
        f". DVC removed this stage's outputs before it ran; the committed {restored} come back with "
        f"`{command}`. To try values without touching the workspace: `dvc exp run --temp -S ...` or the "
        "queue"
    )
