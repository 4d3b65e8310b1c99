"""samplerlab's own lines only: third-party chatter is kept off the console.

Loading bars and notices of diffusers, transformers and huggingface_hub are switched off through
their environment variables (read when those libraries are imported; the model loader also turns
them off around each load). Python warnings raised inside third-party packages (torchmetrics' KID
buffer notice, deprecations) go to the run's log (``samplerlab.log`` in the run folder under the
CLI), and samplerlab's own warnings print as one line, ``samplerlab: warning: …``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

from framework.core.registry import CONF_DIR

LOG = logging.getLogger("samplerlab")

#: Environment defaults that silence third-party output (a value the user set is kept).
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # loading bars; sampling keeps its own progress
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
#: samplerlab's own code (the framework, the built-in plugins); outside it, files under
#: site-packages or the standard library are third-party.
OWN = tuple(str(CONF_DIR.parent / name) + os.sep for name in ("framework", "plugins"))
LIBRARIES = tuple({sysconfig.get_paths()[k] + os.sep for k in ("purelib", "platlib", "stdlib", "platstdlib")})


def third_party(filename: str) -> bool:
    """Whether a warning raised in ``filename`` comes from a library rather than samplerlab or the
    user's own code (their scripts, editable plugin packages)."""
    path = str(Path(filename).resolve()) if filename else ""
    if path.startswith(OWN):
        return False
    return path.startswith(LIBRARIES) or "site-packages" in path or "dist-packages" in path or not path


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` of the CLI: one line on stderr for samplerlab's warnings, the log for
    the libraries'."""
    text = " ".join(str(message).split())
    if third_party(filename):
        LOG.warning("%s: %s (%s:%s)", category.__name__, text, filename, lineno)
    else:
        print(f"samplerlab: warning: {text}", file=sys.stderr if file is None else file)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Within the block: the quiet environment and the one-line warnings."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    previous = warnings.showwarning
    warnings.showwarning = show_warning
    try:
        yield
    finally:
        warnings.showwarning = previous
