"""Developer tools run from a checkout (`python -m tools.<...>` from the repository root); not installed."""
