"""kvstash: a KV-cache engine for RAG and long contexts.

Chunk KV is computed once, kept in tiers (RAM, disk, Redis), reused at any position of later prompts
(prefix reuse, CacheBlend-style blending) and compressed (KIVI quantization, token eviction).
"""

from kvstash.engine import Engine, EngineConfig, GenerationResult
from kvstash.prompt import Segment
from kvstash.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "GenerationResult", "SamplingParams", "Segment"]
__version__ = "0.1.0"
