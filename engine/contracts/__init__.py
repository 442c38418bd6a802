"""Contracts: the types, errors and records every other package speaks."""
