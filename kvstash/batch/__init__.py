"""Continuous batching: the scheduler, its sequences, and the KV memory budget."""
