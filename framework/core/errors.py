"""Errors with a one-line message that names the fix (the CLI prints them and exits with code 2)."""


class SamplerlabError(Exception):
    """Base class: the message is one line that says what is wrong and how to fix it."""


class ConfigError(SamplerlabError):
    """A configuration that cannot run: unknown plugin, wrong type, incompatible combination."""


class ModelNotFoundError(SamplerlabError):
    """A checkpoint that is not available locally (and downloads were not allowed)."""


class NumericalError(SamplerlabError):
    """Non-finite values met during sampling under the ``stop`` policy."""


class PluginError(SamplerlabError):
    """An exception raised inside a plugin's hook, reported with the plugin's name."""

    def __init__(self, plugin: str, hook: str, error: BaseException):
        self.plugin, self.hook, self.error = plugin, hook, error
        super().__init__(f"plugin '{plugin}' failed in hook '{hook}': {type(error).__name__}: {error}")


def call(plugin: str, hook: str, fn, **kwargs):
    """Call one plugin's hook with keywords, reporting a failure with the plugin's name (a
    :class:`PluginError`); samplerlab's own errors and interrupts pass through unchanged."""
    try:
        return fn(**kwargs)
    except (SamplerlabError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise PluginError(plugin, hook, e) from e
