"""Training of the bundled flow-matching model (see ``__main__.py`` and framework/bundled/MODEL_CARD_flow.md)."""
