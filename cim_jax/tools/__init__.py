"""Command-line tools: memory sizing of a config and mesh."""
