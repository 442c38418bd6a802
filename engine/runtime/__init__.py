"""The running engine: wiring, supervision, reload, the embedded server."""
