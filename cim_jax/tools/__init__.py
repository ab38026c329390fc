"""Command-line tools: checkpoint conversion, memory sizing of a step, pictures of CIM pairs."""
