"""Compression of the decode cache after prefill: eviction policies, bit allocation, and the pipeline."""
