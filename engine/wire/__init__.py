"""The wire: how events and references are read off NATS messages."""
