"""Errors a user can cause. The CLI prints their message and exits with `exit_code`, never a traceback."""

from __future__ import annotations


class GpustackError(ValueError):
    """Base of every error caused by input, parameters or the machine, not by a bug in gpustack."""

    exit_code = 1


class ConfigError(GpustackError):
    """A parameter file or a command-line option is wrong. Raised before any slice is read."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, table: str | None = None, key: str | None = None):
        self.file, self.table, self.key = file, table, key
        where = " ".join(part for part in (file and str(file), table and f"[{table}]", key) if part)
        super().__init__(f"{where}: {message}" if where else message)


class InputError(GpustackError):
    """The input data is missing, unreadable or inconsistent (not a TIFF, truncated, shapes differ...)."""

    exit_code = 2


class DeviceError(GpustackError):
    """The requested device cannot be used."""

    exit_code = 2
