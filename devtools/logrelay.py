"""The terminal's view of ``make run``: new lines of every process's log file, each
prefixed with the process's name, copied to stdout as they are written (across
supervisord's rotations)."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO, TextIO

RELAY_POLL_S = 0.1


class _Tail:
    """New complete lines of one log file, across supervisord's rotations."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: BinaryIO | None = None
        self._inode: int | None = None
        self._partial = b""

    def skip_existing(self) -> None:
        """Start at the end of the file as it is now (an earlier run's lines)."""
        if self._open():
            assert self._fh is not None
            self._fh.seek(0, os.SEEK_END)

    def lines(self, *, final: bool = False) -> list[bytes]:
        """The lines written since the last call; ``final``: with an unfinished last one."""
        if self._fh is None and not self._open():
            return []
        assert self._fh is not None
        data = self._fh.read()
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            current = None
        if current is not None and current.st_ino != self._inode:
            # Rotated: the old file is complete, the new one starts from its beginning.
            data += self._fh.read()
            self._fh.close()
            self._fh = None
            if self._open():
                data += self._read()
        elif current is not None and current.st_size < self._fh.tell():
            self._fh.seek(0)
            data += self._fh.read()
        chunks = (self._partial + data).split(b"\n")
        self._partial = chunks.pop()
        if final and self._partial:
            chunks.append(self._partial)
            self._partial = b""
        return chunks

    def _read(self) -> bytes:
        return self._fh.read() if self._fh is not None else b""

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _open(self) -> bool:
        try:
            self._fh = self.path.open("rb")
        except FileNotFoundError:
            return False
        self._inode = os.fstat(self._fh.fileno()).st_ino
        return True


class LogRelay:
    """Copies new lines of several log files to ``out``, each prefixed with its label
    (``web            | ...``), every ``RELAY_POLL_S`` seconds, in a thread."""

    def __init__(self, sources: Mapping[str, Path], out: TextIO) -> None:
        """Sets the start of each file at its current end (an earlier run's lines are
        not shown again); nothing is copied before ``start()``."""
        self._tails = {label: _Tail(path) for label, path in sources.items()}
        for tail in self._tails.values():
            tail.skip_existing()
        self._width = max(len(label) for label in sources)
        self._out = out
        self._reader_gone = False
        # The relay's thread and announce() write to the same stream.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-relay", daemon=True)

    def start(self) -> None:
        """Follow the files, in a thread."""
        self._thread.start()

    def stop(self) -> None:
        """Copy what is left (unfinished last lines too) and stop following."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._copy(final=True)
        for tail in self._tails.values():
            tail.close()

    def _run(self) -> None:
        while not self._stop.wait(RELAY_POLL_S):
            self._copy()

    def announce(self, text: str) -> None:
        """Write ``text`` (a line break added) to ``out`` between two copies of log
        lines, never in the middle of one."""
        with self._lock:
            self._write(text + "\n")

    def _copy(self, *, final: bool = False) -> None:
        with self._lock:
            lines = [
                f"{label:<{self._width}} | {line.decode('utf-8', 'replace').rstrip(chr(13))}\n"
                for label, tail in self._tails.items()
                for line in tail.lines(final=final)
            ]
            if lines:
                self._write("".join(lines))

    def _write(self, text: str) -> None:
        if self._reader_gone:
            return
        try:
            self._out.write(text)
            self._out.flush()
        except BrokenPipeError:
            # Nobody reads our output any more (a closed pipe): the log files keep it all.
            self._reader_gone = True
