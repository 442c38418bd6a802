"""The pipeline's policy: route, rate-limit, batch, drop stale; no I/O."""
