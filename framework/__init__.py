"""samplerlab's engine: hook specifications, state, the sampling loop and what plugins build on.

The framework never imports ``plugins``; plugins import the framework.
"""
import pluggy

PROJECT = "samplerlab"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__version__ = "0.1.0"

__all__ = ["hookimpl", "hookspec", "PROJECT", "__version__"]
