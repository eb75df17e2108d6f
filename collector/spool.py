"""An append-only file of row batches that could not be stored yet, replayed in order.

File `<name>.spool`: records of [4-byte length][4-byte crc32][JSON rows].  A torn record at
the end (the process died mid-write) fails its length or checksum and is cut off with a warning.

File `<name>.spool.pos`: how far replay got, plus the in-flight insert (offset, row count and
the table's row count before it), written atomically before each insert of a spooled batch.
After a crash that marker tells the RowWriter whether the batch landed (collector/writer.py).

File `<name>.spool.lock`: flock()ed while a process uses the spool.  Sizes and offsets live in
memory, so two processes on one spool would delete each other's batches.
"""
import json
import logging
import os
import struct
import zlib
from typing import List, Optional, Tuple

from core import pidlock
from core.process import write_json_atomic
from core.vocabulary import Row

log = logging.getLogger(__name__)
_HEADER = struct.Struct("<II")


class SpoolBusy(RuntimeError):
    """Another process still uses this symbol's spool."""


class Spool:
    """One symbol's spool: append() batches, peek() the oldest, advance() past it once stored.
    Its rows survive a crash; a torn last record is cut off on open."""

    # lock_wait: longer than a stopping collector takes (collector.STOP_GRACE), shorter than
    # the supervisor's default heartbeat_timeout
    def __init__(self, directory: str, name: str, lock_wait: float = 8.0, readonly=False):
        """readonly: look at a spool another process may be using (no lock, no repair)."""
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"{name}.spool")
        self.pos_path = self.path + ".pos"
        self.readonly = readonly
        self._lock = None if readonly else self._take_lock(lock_wait)
        self.offset, self.inflight = self._read_pos()
        self.size = self._recover_size()
        self.rows = self._count_rows()
        self._fd = None

    def _take_lock(self, wait: float):
        """Wait up to `wait` s for a collector that is still stopping (a reload that re-adds
        the symbol, a restart of `mexc run`) to let go."""
        try:
            return pidlock.acquire(self.path + ".lock", wait, on_wait=lambda _holder: log.info(
                "spool %s is in use; waiting up to %.0fs for the other process", self.path, wait))
        except pidlock.Held as e:
            raise SpoolBusy(f"{e}: another collector of this symbol is running (mexc collect, "
                            "or a second mexc run with the same paths.state_dir)") from None

    def __bool__(self) -> bool:
        return self.offset < self.size

    def append(self, rows: List[tuple]) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        body = json.dumps(rows, separators=(",", ":")).encode()
        record = _HEADER.pack(len(body), zlib.crc32(body)) + body
        written = os.write(self._fd, record)
        if written != len(record):  # a short write (disk full): cut it off, report it
            os.ftruncate(self._fd, self.size)
            raise OSError(28, f"short write ({written} of {len(record)} bytes)")
        self.size += len(record)
        self.rows += len(rows)

    def peek(self) -> Tuple[int, List[tuple]]:
        """The oldest unreplayed batch and the offset just after it."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            length, _crc = _HEADER.unpack(f.read(_HEADER.size))
            rows = [Row(*r) for r in json.loads(f.read(length))]
        return self.offset + _HEADER.size + length, rows

    def mark_inflight(self, table_rows: int, batch_rows: int) -> None:
        self.inflight = (self.offset, table_rows, batch_rows)
        self._write_pos()

    def advance(self, next_offset: int, batch_rows: int) -> None:
        """The batch before next_offset is stored: move past it; empty the spool when done."""
        self.offset, self.inflight = next_offset, None
        self.rows -= batch_rows
        if self.offset >= self.size:
            self.clear()
        else:
            self._write_pos()

    def clear(self) -> None:
        self.close()
        for path in (self.path, self.pos_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.offset = self.size = self.rows = 0
        self.inflight = None

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    def _write_pos(self) -> None:
        write_json_atomic(self.pos_path, {"offset": self.offset, "inflight": self.inflight})

    def _read_pos(self) -> Tuple[int, Optional[tuple]]:
        try:
            with open(self.pos_path) as f:
                pos = json.load(f)
            return int(pos["offset"]), tuple(pos["inflight"]) if pos["inflight"] else None
        except FileNotFoundError:
            return 0, None
        except (ValueError, KeyError, TypeError) as e:
            raise RuntimeError(f"{self.pos_path} is damaged ({e}); move it aside to replay "
                               f"{self.path} from the start") from None

    def _recover_size(self) -> int:
        """Size of the intact records; cut a torn tail left by a crash."""
        try:
            f = open(self.path, "r+b")
        except FileNotFoundError:
            return 0
        with f:
            good = 0
            while True:
                header = f.read(_HEADER.size)
                if len(header) < _HEADER.size:
                    break
                length, crc = _HEADER.unpack(header)
                body = f.read(length)
                if len(body) < length or zlib.crc32(body) != crc:
                    break
                good = f.tell()
            end = f.seek(0, os.SEEK_END)
            if end != good and not self.readonly:
                log.warning("spool %s: cutting %d bytes of a torn record at offset %d",
                            self.path, end - good, good)
                f.truncate(good)
        return good

    def _count_rows(self) -> int:
        rows, offset = 0, self.offset
        if offset >= self.size:
            return 0
        with open(self.path, "rb") as f:
            f.seek(offset)
            while offset < self.size:
                length, _crc = _HEADER.unpack(f.read(_HEADER.size))
                rows += len(json.loads(f.read(length)))
                offset += _HEADER.size + length
        return rows

