"""Incremental detokenization with stop strings."""

from __future__ import annotations

from kvstash.detok import TextStream


class _CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_a_possible_stop_prefix():
    ts = TextStream(_CharTokenizer(), stop=("END",))
    out = [ts.push(ord(c)) for c in "abcEN"]
    assert "".join(out) == "abc"  # "EN" may be the start of "END"
    out.append(ts.push(ord("D")))
    assert ts.stopped and ts.text == "abc" and "".join(out) == "abc"


def test_text_stream_releases_held_text_when_it_is_not_a_stop():
    ts = TextStream(_CharTokenizer(), stop=("END",))
    out = [ts.push(ord(c)) for c in "aENx"]
    assert "".join(out) + ts.flush() == "aENx" and not ts.stopped
