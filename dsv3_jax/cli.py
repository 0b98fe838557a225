"""What the command-line entry points (train, generate, convert) share."""

from __future__ import annotations

import logging

from absl import logging as absl_logging

_NOISY_LIBRARIES = ("orbax", "grain", "jax")


class _QuietLibraries(logging.Filter):
    """Drops the INFO chatter of the checkpoint, data and jax libraries (warnings still show)."""

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = any(f"/{lib}/" in record.pathname for lib in _NOISY_LIBRARIES)
        return record.levelno >= logging.WARNING or not noisy


def quiet_library_logs() -> None:
    """Keeps the run's own log readable; call once from an entry point's main."""
    absl_logging.get_absl_handler().addFilter(_QuietLibraries())
