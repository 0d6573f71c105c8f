"""The one base class of mistakes a user can fix, and how commands report them: one line, no traceback."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TypeVar

import click

F = TypeVar("F", bound=Callable)


class PipelineError(ValueError):
    """Bad configuration, bad data, missing inputs: the message names the problem and the fix."""


class ConfigError(PipelineError):
    """A value in params.yaml is wrong; the message names the key and the fix."""


class DataError(PipelineError):
    """The data root or a file in it cannot be used as prepared; the message says what to fix."""


def user_errors(command: F) -> F:
    """Wrap a click command: set up logging and the BLAS threads (`one_blas_pool`), and turn a `PipelineError`
    into click's one-line error (exit 1)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        from pipeline.core.threads import one_blas_pool  # imports numpy and scipy: not at this module's import

        one_blas_pool()
        try:
            return command(*args, **kwargs)
        except PipelineError as err:
            raise click.ClickException(str(err)) from err

    return wrapper  # type: ignore[return-value]
