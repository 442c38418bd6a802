"""Configuration as data: frozen models, their checks, loading."""
