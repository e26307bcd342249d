"""Error types. A :class:`UserError` is something the person running ``bench`` can fix (a bad config
value, a missing folder); the CLI prints its one-sentence message and exits with code 2, no traceback.
A :class:`PluginError` is raised by the harness when a plugin breaks its contract (NaN images, wrong
shape); it fails that plugin's cell, never the run."""

from __future__ import annotations


class BenchError(Exception):
    """Base class of MarkBench's own errors."""


class UserError(BenchError):
    """Bad input from the user: printed as one sentence, exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """A config file or option has a bad value. The message names file, key, value and what is allowed."""


class PluginValidationError(BenchError):
    """A plugin class does not fit its registry (wrong base class, bad parameter declarations)."""


class PluginError(BenchError):
    """A plugin broke its contract at run time (e.g. returned NaN images). Fails its cell only."""


class MissingDependencyError(UserError):
    """An optional dependency is needed; the message names the extra to install."""


def require(module: str, extra: str):
    """Import ``module`` or raise a :class:`MissingDependencyError` naming the pip extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"this needs the Python package '{module}', which is not installed; "
            f"install it with: pip install 'markbench[{extra}]'"
        ) from exc
