"""Kernel choices: timed once per machine and remembered in $KVSTASH_HOME/kernels.json, so two processes run
the same kernels (and write the same KV bytes); KVSTASH_KERNELS forces one."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from kvstash.model import choice


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTASH_HOME", str(tmp_path))
    monkeypatch.delenv("KVSTASH_KERNELS", raising=False)
    return tmp_path


class Kernel:
    """A fake kernel taking ``delay`` seconds a call, counting its calls."""

    def __init__(self, delay: float):
        self.delay, self.calls = delay, 0

    def __call__(self, rows: int) -> None:
        self.calls += 1
        time.sleep(self.delay)


def test_the_faster_kernel_is_chosen_and_remembered_for_the_next_process(home):
    slow, fast = Kernel(0.004), Kernel(0.0)
    assert choice.choose("head 8x4 float32", slow, fast, margin=0.9) is True
    assert slow.calls > 0 and fast.calls > 0
    (key,) = json.loads((home / "kernels.json").read_text())
    assert key.startswith("head 8x4 float32 | ") and "threads | torch " in key
    # later: the same weights on the same machine read the answer, even if timing would now say otherwise
    slow2, fast2 = Kernel(0.0), Kernel(0.004)
    assert choice.choose("head 8x4 float32", slow2, fast2, margin=0.9) is True
    assert slow2.calls == fast2.calls == 0
    # other weights are timed for themselves, and both answers are kept
    assert choice.choose("head 16x4 float32", Kernel(0.0), Kernel(0.004), margin=0.9) is False
    assert sorted(json.loads((home / "kernels.json").read_text()).values()) == [False, True]


def test_a_second_process_reads_the_first_ones_answer(home):
    choice.choose("projections 2 layers", Kernel(0.004), Kernel(0.0), margin=0.9)
    code = (
        "from kvstash.model import choice\n"
        "def boom(rows): raise SystemExit('timed again')\n"
        "print(choice.choose('projections 2 layers', boom, boom, margin=0.9))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_processes_that_start_together_agree(home):
    """Two processes time at once, each finding the other kernel faster: the lock makes the second wait for
    the first's answer, so both run the same kernels."""
    code = (
        "import sys, time\n"
        "from kvstash.model import choice\n"
        "slow = lambda rows: time.sleep(0.05)\n"
        "fast = lambda rows: None\n"
        "prefer = sys.argv[1] == 'candidate'\n"
        "print(choice.choose('head 8x4 float32', fast if prefer else slow, slow if prefer else fast, margin=0.9))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, who], stdout=subprocess.PIPE, text=True)
             for who in ("candidate", "plain")]  # fmt: skip
    answers = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(answers) == 1 and answers <= {"True", "False"}


@pytest.mark.parametrize("forced, want", [("torch", False), ("onednn", True), ("ONEDNN", True)])
def test_kvstash_kernels_forces_a_choice_without_timing(home, monkeypatch, forced, want):
    monkeypatch.setenv("KVSTASH_KERNELS", forced)
    plain, candidate = Kernel(0.0), Kernel(0.0)
    assert choice.choose("head 8x4 float32", plain, candidate, margin=0.9) is want
    assert plain.calls == candidate.calls == 0 and not (home / "kernels.json").exists()


def test_an_unknown_kvstash_kernels_says_what_it_takes(home, monkeypatch):
    monkeypatch.setenv("KVSTASH_KERNELS", "mkl")
    with pytest.raises(ValueError, match="auto, torch, onednn"):
        choice.choose("head 8x4 float32", Kernel(0.0), Kernel(0.0), margin=0.9)


def test_a_corrupt_file_is_timed_again_and_rewritten(home, caplog):
    (home / "kernels.json").write_text('{"head 8x4')  # truncated
    assert choice.choose("head 8x4 float32", Kernel(0.004), Kernel(0.0), margin=0.9) is True
    assert "timed again" in caplog.text
    assert list(json.loads((home / "kernels.json").read_text()).values()) == [True]


def test_a_home_that_cannot_be_written_still_gives_an_answer(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("KVSTASH_HOME", str(blocker / "home"))  # a path under a file: mkdir fails
    monkeypatch.delenv("KVSTASH_KERNELS", raising=False)
    assert choice.choose("head 8x4 float32", Kernel(0.004), Kernel(0.0), margin=0.9) is True
