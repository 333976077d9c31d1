"""coderd-dev: a development coderd serving the agent API in memory (``twistd coderd-dev``)."""
