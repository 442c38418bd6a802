"""Real streams in, results out: the producer SDK, media and text sources, and the results consumer."""
