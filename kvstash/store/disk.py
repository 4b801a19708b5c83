"""Disk tier: one file per record in a directory, atomic writes, LRU by file mtime within a byte budget.

Files are ``<key>.kv``. A write goes to a hidden temp file unique to the process and thread, is fsynced,
then renamed over the final name, so readers (in any process) see the old record, the new one or none,
never a partial one. A hit sets the file's mtime to now, so the LRU order survives restarts: opening
the directory rescans it and orders records by mtime.

Several processes may share a directory. Each keeps its own index of sizes and recency; a process sees
another's files when it reads them and on :meth:`DiskTier.gc`, which rescans and re-applies the budget.
Stats read the directory itself (record headers only), and the event counters are shared through
``.kvstash-counters.json`` in the directory (:class:`kvstash.store.counters.FileCounters`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from kvstash.store.base import KEY_RE, StoreConfig, Tier
from kvstash.store.counters import Counters, FileCounters
from kvstash.store.scan import HeadInfo, header_end, parse_head

SUFFIX = ".kv"
_TMP_SUFFIX = ".tmp"
STALE_TMP_SECONDS = 600  # gc() removes temp files older than this (left by a crashed writer)
HEAD_READ = 1024  # first read of a record for stats (enough for scan.parse_head's fast path)


class DiskTier(Tier):
    name = "disk"

    def __init__(self, config: StoreConfig, root: str | os.PathLike, budget_bytes: int | None = None) -> None:
        self.root = Path(root).expanduser()
        super().__init__(config, budget_bytes)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot use {self.root} as a disk store: {e}; pick a writable directory") from e
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> file size, least recently used first
        self._bytes = 0  # sum of sizes in _index
        self._clock_ns = 0  # last mtime this process set; keeps its own touches strictly ordered
        self._lock = threading.Lock()  # guards _index, _bytes, _clock_ns
        self._head_cache: dict[str, tuple[tuple[int, int, int], HeadInfo | None]] = {}  # key -> (file id, head)
        self._rescan()

    def _path(self, key: str) -> Path:
        return self.root / (key + SUFFIX)

    # --- Tier hooks -----------------------------------------------------------------------------

    def _read(self, key: str, touch: bool = True) -> bytearray | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                buf = bytearray(os.fstat(f.fileno()).st_size)
                del buf[f.readinto(buf) :]  # a short read leaves a short blob; the checksum catches it
        except FileNotFoundError:
            self._forget(key)
            return None
        except OSError as e:
            self._backend_error("read", e)
            return None
        self._backend_ok()
        if touch:
            self._touch(key, path, len(buf))
        return buf

    def _read_range(self, key: str, offset: int, length: int, touch: bool = False) -> bytearray | None:
        """``os.preadv`` of [offset, offset + length) into a fresh buffer (decoded in place, no copy): fewer
        bytes at the end of the file, b"" for a file that is gone, None (counted) for an I/O error."""
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._forget(key)
            return bytearray()
        except OSError as e:
            self._backend_error("read", e)
            return None
        try:
            buf = _pread_full(fd, offset, length)
            size = os.fstat(fd).st_size
        except OSError as e:
            self._backend_error("read", e)
            return None
        finally:
            os.close(fd)
        self._backend_ok()
        if touch:
            self._touch(key, path, size)
        return buf

    def _write(self, key: str, blob: bytes) -> bool:
        if self.budget_bytes is not None and len(blob) > self.budget_bytes:
            self._count(rejected=1)
            return False
        path = self._path(key)
        tmp = self.root / f".{key}.{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
        try:
            self._write_atomic(tmp, path, blob)
        except OSError as e:
            self._backend_error("write", e)
            return False
        self._backend_ok()
        with self._lock:
            self._bytes -= self._index.pop(key, 0)
            self._index[key] = len(blob)
            self._bytes += len(blob)
            victims = self._pick_victims(keep=key)
        self._unlink_victims(victims)
        return True

    def _remove(self, key: str) -> bool:
        self._forget(key)
        try:
            self._path(key).unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            self._backend_error("delete", e)
            return False

    def _contains(self, key: str) -> bool:
        return self._path(key).is_file()

    def _iter_keys(self) -> Iterator[str]:
        return iter([key for key, _ in self._list_files()])

    def _make_counters(self) -> Counters:
        return FileCounters(self.root)

    def _heads(self) -> Iterator[tuple[int, HeadInfo | None]]:
        """Every record file's size and header; a header is re-read only when its file changed (inode,
        size or mtime), so repeated stats on a large directory cost one scandir plus what changed."""
        cache: dict[str, tuple[tuple[int, int, int], HeadInfo | None]] = {}
        out = []
        for key, st in self._list_files():
            ident = (st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self._head_cache.get(key)
            info = cached[1] if cached is not None and cached[0] == ident else self._read_head(key)
            cache[key] = (ident, info)
            out.append((st.st_size, info))
        self._head_cache = cache
        return iter(out)

    def _read_head(self, key: str) -> HeadInfo | None:
        try:
            with open(self._path(key), "rb") as f:
                head = f.read(HEAD_READ)
                info, end = parse_head(head), header_end(head)
                if info is None and end is not None and end > len(head):  # an unusual header: read it whole
                    info = parse_head(head + f.read(end - len(head)))
        except OSError:  # removed meanwhile, or unreadable: counted as unreadable, verify will say more
            return None
        return info

    def _clear(self) -> None:
        for key, _ in self._list_files():
            self._remove(key)

    def gc(self) -> int:
        """Remove stale temp files, rescan the directory and evict down to the budget."""
        removed = 0
        cutoff = time.time() - STALE_TMP_SECONDS
        with os.scandir(self.root) as it:
            for entry in it:
                if entry.name.startswith(".") and entry.name.endswith(_TMP_SUFFIX):
                    try:
                        if entry.stat().st_mtime < cutoff:
                            os.unlink(entry.path)
                            removed += 1
                    except FileNotFoundError:
                        pass
        self._rescan()
        with self._lock:
            victims = self._pick_victims(keep=None)
        self._unlink_victims(victims)
        return removed + len(victims)

    # --- LRU bookkeeping ------------------------------------------------------------------------

    def lru_keys(self) -> list[str]:
        """Keys from least to most recently used, as this process sees them (the eviction order)."""
        with self._lock:
            return list(self._index)

    def check_integrity(self) -> None:
        """Raise RuntimeError with the numbers if the index's byte count does not add up."""
        with self._lock:
            entries, counted, actual = len(self._index), self._bytes, sum(self._index.values())
        if actual != counted:
            raise RuntimeError(f"disk tier accounting broken: {entries} entries of {actual} bytes, counted {counted}")

    def _rescan(self) -> None:
        files = self._list_files()
        files.sort(key=lambda kf: (kf[1].st_mtime_ns, kf[0]))
        with self._lock:
            self._index = OrderedDict((key, st.st_size) for key, st in files)
            self._bytes = sum(self._index.values())
            self._clock_ns = max([self._clock_ns] + [st.st_mtime_ns for _, st in files])

    def _list_files(self) -> list[tuple[str, os.stat_result]]:
        """(key, stat) of every record file; temp files and foreign names are ignored."""
        out = []
        with os.scandir(self.root) as it:
            for entry in it:
                key = entry.name.removesuffix(SUFFIX)
                if key == entry.name or not KEY_RE.fullmatch(key):
                    continue
                with contextlib.suppress(FileNotFoundError):  # removed by another process meanwhile
                    out.append((key, entry.stat()))
        return out

    def _now_ns(self) -> int:
        with self._lock:
            self._clock_ns = max(time.time_ns(), self._clock_ns + 1)
            return self._clock_ns

    def _touch(self, key: str, path: Path, size: int) -> None:
        ns = self._now_ns()
        with contextlib.suppress(OSError):  # replaced or removed meanwhile; recency is only a hint
            os.utime(path, ns=(ns, ns))
        with self._lock:
            self._bytes += size - self._index.pop(key, 0)
            self._index[key] = size

    def _forget(self, key: str) -> None:
        with self._lock:
            self._bytes -= self._index.pop(key, 0)

    def _pick_victims(self, keep: str | None) -> list[str]:
        """Pop least-recently-used keys (never ``keep``) from the index until within budget. Lock held."""
        victims: list[str] = []
        if self.budget_bytes is None:
            return victims
        for key in list(self._index):
            if self._bytes <= self.budget_bytes:
                break
            if key != keep:
                self._bytes -= self._index.pop(key)
                victims.append(key)
        return victims

    def _unlink_victims(self, victims: list[str]) -> None:
        for key in victims:
            try:
                self._path(key).unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                self._backend_error("evict", e)
        if victims:
            self._count(evictions=len(victims))

    def _write_atomic(self, tmp: Path, path: Path, blob: bytes) -> None:
        ns = self._now_ns()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.utime(tmp, ns=(ns, ns))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _pread_full(fd: int, offset: int, length: int) -> bytearray:
    """Bytes [offset, offset + length) of an open file; fewer only where the file ends sooner."""
    buf = bytearray(length)
    got = 0
    while got < length:
        n = os.preadv(fd, [memoryview(buf)[got:]], offset + got)
        if n == 0:  # end of file
            break
        got += n
    del buf[got:]
    return buf
