"""Observers: counters, metrics, traces, logs and the $SRV service."""
