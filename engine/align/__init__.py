"""Alignment: fuse each source's features by event time."""
