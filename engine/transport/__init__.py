"""Transports: how messages reach the pipeline and results leave it (core NATS, JetStream)."""
