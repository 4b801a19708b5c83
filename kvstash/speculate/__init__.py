"""Speculative decoding: drafters, draft trees, and their verification in one pass (SpecInfer-style)."""
