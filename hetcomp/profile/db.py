"""The profile database: measured kernel times in SQLite, keyed by unit fingerprint.

A profile is reused while its unit's :class:`~hetcomp.profile.units.Fingerprint` digest is
unchanged; a run is marked complete only after all its rows are stored, so an interrupted
profile is measured again rather than half reused. Only measurements are stored here
(``source="measured"``); spec estimates are computed on demand and never written.

Pure Python (sqlite3): no TVM.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import time

from ..cost.roofline import Features
from ..errors import HetcompError

SCHEMA_VERSION = 1
_MODES = ("quick", "full")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS units (
    digest TEXT PRIMARY KEY, unit TEXT NOT NULL, info TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    digest TEXT NOT NULL, mode TEXT NOT NULL, model TEXT NOT NULL, complete INTEGER NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (digest, mode, model));
CREATE TABLE IF NOT EXISTS measurements (
    digest TEXT NOT NULL, model TEXT NOT NULL, op TEXT NOT NULL, kind TEXT NOT NULL,
    w INTEGER NOT NULL, n INTEGER NOT NULL, k INTEGER NOT NULL, r REAL NOT NULL,
    cache_len INTEGER NOT NULL, corun INTEGER NOT NULL, flops REAL NOT NULL,
    bytes REAL NOT NULL, seconds REAL NOT NULL, calls INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS measurements_by_unit ON measurements (digest, model, op);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One measured kernel: its features, the unit it ran on and its time per call."""

    unit: str
    features: Features
    seconds: float
    calls: int = 1
    source: str = "measured"


def is_sqlite(path: str) -> bool:
    """True for an SQLite file (its 16-byte header), so a user's other file is never
    turned into a database."""
    try:
        with open(path, "rb") as fh:
            return fh.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


class ProfileDB:
    """An SQLite profile file.

    Parameters
    ----------
    path : str
        The database file (created if missing). Use as a context manager or call
        :meth:`close`.
    """

    def __init__(self, path: str):
        self.path = path
        if os.path.lexists(path) and not is_sqlite(path):
            raise HetcompError(f"{path} exists and is not a profile database (SQLite): "
                               "refusing to use it")
        try:
            self._con = sqlite3.connect(path)
            self._con.executescript(_SCHEMA)
            row = self._con.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._con.execute("INSERT INTO meta VALUES ('schema', ?)",
                                  (str(SCHEMA_VERSION),))
                self._con.commit()
            elif int(row[0]) != SCHEMA_VERSION:
                raise HetcompError(f"{path}: profile schema {row[0]}, expected "
                                   f"{SCHEMA_VERSION}")
        except (sqlite3.Error, ValueError) as e:
            raise HetcompError(f"{path} is not a usable profile database: {e}") from None

    def __enter__(self) -> ProfileDB:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._con.close()

    def is_complete(self, digest: str, model: str, mode: str = "full") -> bool:
        """Whether a complete profile for ``digest`` and ``model`` exists (full satisfies quick)."""
        modes = _MODES[_MODES.index(mode):]
        marks = ",".join("?" * len(modes))
        row = self._con.execute(
            f"SELECT 1 FROM runs WHERE digest=? AND model=? AND complete=1 AND mode IN ({marks})",
            (digest, model, *modes)).fetchone()
        return row is not None

    def complete_mode(self, digest: str, model: str) -> str | None:
        """The most thorough complete mode stored for ``digest`` and ``model``, or None."""
        for mode in reversed(_MODES):
            if self.is_complete(digest, model, mode):
                return mode
        return None

    def store(self, unit_info: dict, digest: str, model: str, mode: str,
              rows: list[Measurement]) -> None:
        """Replace the ``(digest, model)`` profile by ``rows`` and mark it complete."""
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}")
        if any(m.source != "measured" for m in rows):
            raise ValueError("only measurements are stored in a profile (no spec estimates)")
        now = time.time()
        with self._con:
            self._con.execute("INSERT OR REPLACE INTO units VALUES (?, ?, ?, ?)",
                              (digest, unit_info.get("name", ""), json.dumps(unit_info), now))
            self._con.execute("DELETE FROM measurements WHERE digest=? AND model=?",
                              (digest, model))
            self._con.execute("DELETE FROM runs WHERE digest=? AND model=?", (digest, model))
            self._con.executemany(
                "INSERT INTO measurements VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(digest, model, m.features.op, m.features.kind, m.features.w, m.features.n,
                  m.features.k, m.features.r, m.features.cache_len, int(m.features.corun),
                  m.features.flops, m.features.bytes, m.seconds, m.calls) for m in rows])
            self._con.execute("INSERT INTO runs VALUES (?, ?, ?, 1, ?)",
                              (digest, mode, model, now))

    def merge_from(self, other: ProfileDB) -> int:
        """Copy every complete profile of ``other`` (e.g. units profiled in separate runs on
        a remote host) into this database; returns how many were copied."""
        copied = 0
        for digest in other.digests():
            for (model,) in other._con.execute(
                    "SELECT DISTINCT model FROM runs WHERE digest=? AND complete=1", (digest,)):
                mode = other.complete_mode(digest, model)
                self.store(other.unit_info(digest) or {}, digest, model, mode,
                           other.measurements(digest, model))
                copied += 1
        return copied

    def measurements(self, digest: str, model: str, op: str | None = None) -> list[Measurement]:
        """The stored rows of one profile, optionally of one op class."""
        sql = ("SELECT u.unit, m.op, m.kind, m.w, m.n, m.k, m.r, m.cache_len, m.corun, m.flops,"
               " m.bytes, m.seconds, m.calls FROM measurements m JOIN units u USING (digest)"
               " WHERE m.digest=? AND m.model=?")
        args: tuple = (digest, model)
        if op is not None:
            sql += " AND m.op=?"
            args += (op,)
        out = []
        for unit, op_, kind, w, n, k, r, cl, corun, flops, nbytes, sec, calls in \
                self._con.execute(sql + " ORDER BY m.rowid", args):
            feat = Features(op_, kind, w, n, k, r, cl, bool(corun), flops, nbytes)
            out.append(Measurement(unit, feat, sec, calls))
        return out

    def unit_info(self, digest: str) -> dict | None:
        row = self._con.execute("SELECT info FROM units WHERE digest=?", (digest,)).fetchone()
        return json.loads(row[0]) if row else None

    def digests(self, unit: str | None = None) -> list[str]:
        """Fingerprint digests with a stored profile (of one unit name, if given)."""
        sql, args = "SELECT digest FROM units", ()
        if unit is not None:
            sql, args = sql + " WHERE unit=?", (unit,)
        return [d for (d,) in self._con.execute(sql + " ORDER BY created", args)]

    def drop(self, digest: str) -> None:
        """Delete a profile (e.g. one whose fingerprint no longer matches the machine)."""
        with self._con:
            for table in ("measurements", "runs", "units"):
                self._con.execute(f"DELETE FROM {table} WHERE digest=?", (digest,))
