"""The pluggy markers of samplerlab: ``hookspec`` (the core's specs) and ``hookimpl`` (plugins)."""
import pluggy

PROJECT = "samplerlab"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
