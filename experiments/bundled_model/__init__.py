"""Training of the bundled default model (see ``__main__.py`` and framework/bundled/MODEL_CARD.md)."""
