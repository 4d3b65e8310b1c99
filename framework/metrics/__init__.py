"""Shared pieces of the metrics plugins (feature extractors, real-vs-generated bookkeeping)."""
