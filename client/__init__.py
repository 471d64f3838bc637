"""Client side of the ``infinisst`` Triton model: streaming API, command-line tools and load-test helpers."""
