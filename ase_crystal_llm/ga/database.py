"""The search's database: an ``ase_ga`` database that several workers can share.

:class:`SearchConnection` is ``ase_ga``'s ``DataConnection`` opened on any
ase.db address (a file, or ``postgresql://...``: ``DataConnection`` itself
insists on a file), with the three things a shared search needs on top:

* **a lock** (:meth:`SearchConnection.locked`): ``flock`` beside a file,
  a PostgreSQL advisory lock on a server; claims and new children are
  written under it, so no two workers take the same candidate;
* **claims** (:meth:`SearchConnection.claim`): ``ase_ga``'s ``queued=1`` row,
  stamped with the worker (host and process) and time;
* **take-over of dead claims** (:meth:`SearchConnection.release_stale`): a
  claim whose process is gone (same host), or older than the lease (another
  host), goes back to the unrelaxed candidates, so a killed worker loses nothing.

Rows stay ``ase_ga``'s: any ``ase_ga`` tool (``Population``, ``ase db``)
reads a finished search.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ase.db

from ase_crystal_llm import settings
from ase_crystal_llm.io.outputs import connect_database, is_db_url

try:  # ase_ga is the GA's home since ASE 3.26; older ASE ships it as ase.ga
    from ase_ga.data import DataConnection
except ImportError:  # pragma: no cover - depends on the installed ASE
    from ase.ga.data import DataConnection

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ase import Atoms

__all__ = [
    "SearchConnection", "database_exists", "search_lock", "worker_id",
]


# Any constant identifies the search's lock among the server's advisory locks.
_ADVISORY_LOCK_KEY = 0x43524C4C  # "CRLL"


def worker_id() -> str:
    """This process as ``host:pid``, stamped on its claims."""
    return f"{socket.gethostname()}:{os.getpid()}"


def database_exists(address: str | os.PathLike) -> bool:
    """``True`` when ``address`` holds a search (its first row, ase_ga's settings row)."""
    if not is_db_url(address) and not Path(address).is_file():
        return False
    return ase.db.connect(str(address)).count() > 0


@contextlib.contextmanager
def search_lock(address: str | os.PathLike) -> Iterator[None]:
    """The lock of the search at ``address`` (held while creating it, claiming and adding candidates)."""
    if is_db_url(address):
        with _advisory_lock(str(address)):
            yield
    else:
        with _file_lock(Path(address).with_name(Path(address).name + ".search-lock")):
            yield


class SearchConnection(DataConnection):
    """``ase_ga``'s ``DataConnection`` on a file or a database server, shareable by workers.

    Parameters
    ----------
    address : str or path
        An ase.db file or a server address (``postgresql://user@host/db``)
        that already holds a search (:func:`database_exists`).
    lease : float
        Seconds after which a claim made on another host counts as abandoned.
    """

    def __init__(self, address: str | os.PathLike, lease: float = 3600.0) -> None:
        # DataConnection.__init__ refuses anything but a file: set up its state here.
        self.db_file_name = str(address)
        self.c = connect_database(self.db_file_name)
        self.already_returned = set()
        self.lease = float(lease)
        self.worker = worker_id()

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold the search's lock: one worker at a time claims and adds candidates."""
        return search_lock(self.db_file_name)

    def settings(self) -> dict[str, Any]:
        """What the search was started with (the data of ase_ga's first row)."""
        return dict(self.c.get(1).data)

    def claim(self, candidate: Atoms) -> None:
        """Mark ``candidate`` as taken by this worker (ase_ga's ``queued=1`` row, with worker and time)."""
        self.c.write(None, gaid=candidate.info["confid"], queued=1, worker=self.worker, claimed=time.time(),
                     key_value_pairs=candidate.info.get("key_value_pairs", {}))

    def claims(self) -> dict[int, tuple[str, float]]:
        """Claims without a relaxed result yet: ``{gaid: (worker, time)}``."""
        done = {row.gaid for row in self.c.select(relaxed=1)}
        return {row.gaid: (row.get("worker", ""), row.get("claimed", 0.0))
                for row in self.c.select(queued=1) if row.gaid not in done}

    def release_stale(self) -> list[int]:
        """Return abandoned claims to the unrelaxed candidates; their ids."""
        host = socket.gethostname()
        released = []
        for gaid, (worker, claimed) in self.claims().items():
            owner_host, _, pid = worker.rpartition(":")
            dead = owner_host == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid))
            if dead or time.time() - claimed > self.lease or not worker:
                self.remove_from_queue(gaid)
                released.append(gaid)
        return released

    def count_relaxed(self) -> int:
        """Candidates with a result (relaxed or failed): the relaxations spent."""
        return len({row.gaid for row in self.c.select(relaxed=1)})

    def unrelaxed(self, n: int) -> list[Atoms]:
        """Up to ``n`` candidates that nobody has relaxed or claimed, oldest first."""
        ids = sorted(self.__get_ids_of_all_unrelaxed_candidates__())[:max(0, int(n))]
        out = []
        for gaid in ids:
            atoms = self.__get_latest_traj_for_confid__(gaid)
            atoms.info["confid"] = gaid
            atoms.info.setdefault("data", {})
            out.append(atoms)
        return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    # A killed worker its parent has not reaped yet still answers signals: a zombie holds no claim.
    if not Path("/proc/self/stat").exists():  # no procfs (macOS): trust the signal
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):  # gone meanwhile
        return False
    return state not in ("Z", "X")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released by the kernel if this process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _advisory_lock(url: str) -> Iterator[None]:
    psycopg2 = settings.require("psycopg2")
    connection = psycopg2.connect(url)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:  # released by the server if this connection drops
            cursor.execute("SELECT pg_advisory_lock(%s)", (_ADVISORY_LOCK_KEY,))
        yield
    finally:
        connection.close()
