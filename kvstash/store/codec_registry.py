"""The codecs by the name a user types (``--codec``): filled here, explicitly, from the codec modules."""

from __future__ import annotations

from kvstash.store.codec import Codec
from kvstash.store.dense_codec import Bf16Codec, Fp16Codec, Fp32Codec
from kvstash.store.kivi_codec import Kivi2Codec, Kivi4Codec, Kivi8Codec

CODECS: dict[str, type[Codec]] = {
    c.name: c for c in (Fp32Codec, Fp16Codec, Bf16Codec, Kivi8Codec, Kivi4Codec, Kivi2Codec)
}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Add a codec of your own under ``cls.name`` (usable as a decorator)."""
    CODECS[cls.name] = cls
    return cls


def get_codec(name: str) -> Codec:
    """The codec a user names (``fp16``, ``kivi4``, ...). Unknown name: ValueError listing the known ones."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of: {', '.join(sorted(CODECS))}")
    return CODECS[name]()
