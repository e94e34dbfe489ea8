"""Streaming, crash-safe structure writers.

:class:`StructureWriter` appends structures one by one to ``.extxyz``,
``.cif`` (one multi-block file), ``.traj``, ``.db`` (ase.db) or ``.crystxt``
(crystal text).  Every structure is made durable before the next one is
written (one write call plus flush and fsync for text formats, one
transaction per row for ase.db), so an interrupted run keeps every structure
it finished and never leaves half a structure behind.

Rows carry identifiers ``run_id``, ``rank`` and ``sample_index`` (from
``atoms.info``); a writer opened with ``append=True`` reads the
``(run_id, sample_index)`` pairs already in the file and skips structures it
has, so a resumed run appends without duplicates.

A run record (model path and weight hash, package version, seed, settings,
statistics) is kept beside the output in ``<output>.run.json``; ase.db files
also hold it in their metadata.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ase.db.core import Database, reserved_keys, word

from ase_crystal_llm.info_keys import RUN_ID, SAMPLE_INDEX
from ase_crystal_llm.io.files import atomic_write, fsync, plain
from ase_crystal_llm.text.format import LINE_SEPARATOR, atoms_to_text, split_crystals, text_to_atoms

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from ase import Atoms

__all__ = [
    "CIF_END", "DATA_KEYS", "DB_URL_SCHEMES", "FORMATS", "ID_KEYS", "StructureWriter", "check_output",
    "connect_database",
    "identifier", "is_cif_archive", "is_db_url", "merge_outputs", "output_format", "read_run_records",
    "run_record_path", "split_info", "write_cif_archive", "write_run_record",
]


FORMATS = {
    ".extxyz": "extxyz",
    ".xyz": "extxyz",
    ".cif": "cif",
    ".traj": "traj",
    ".db": "db",
    ".crystxt": "crystal-text",
}


ID_KEYS = ("run_id", "rank", "sample_index")


# Long or multi-line text goes to ase.db's ``data``, not key_value_pairs.
DATA_KEYS = ("generated_text", "prompt")


CIF_END = "#end_of_structure\n\n"


DB_URL_SCHEMES = ("postgresql://", "postgres://", "mysql://", "mariadb://")


def is_db_url(path: str | os.PathLike) -> bool:
    """True for an ase.db server address (``postgresql://user@host:port/db``), which is not a path."""
    return isinstance(path, str) and path.lower().startswith(DB_URL_SCHEMES)


def output_format(path: str | os.PathLike) -> str:
    """The writer format for ``path`` from its extension; a clear error otherwise."""
    if is_db_url(path):
        return "db"
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"unsupported output extension {suffix or '(none)'!r} for {path}: use "
                         + ", ".join(sorted(FORMATS)))
    return FORMATS[suffix]


def identifier(info: Mapping[str, Any]) -> tuple[str, int] | None:
    """``(run_id, sample_index)`` of a structure, or ``None`` when it has none.

    ``sample_index`` numbers the crystals of a whole run (over all ranks), so
    the pair identifies a structure; ``rank`` is stored for the record.
    """
    if RUN_ID not in info or SAMPLE_INDEX not in info:
        return None
    return (str(info[RUN_ID]), int(info[SAMPLE_INDEX]))


def split_info(info: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``atoms.info`` into ase.db ``key_value_pairs`` and ``data``.

    Keys follow ase.db's rules (identifier-like, not reserved, scalar values;
    strings that read as numbers are refused by ase.db), so anything else
    goes to ``data``.
    """
    kvp, data = {}, {}
    for key, value in info.items():
        value = plain(value)
        finite = not (isinstance(value, float) and not np.isfinite(value))
        scalar = isinstance(value, (bool, int, float, str)) and finite
        if (key in DATA_KEYS or not scalar or not word.match(key) or key in reserved_keys
                or (isinstance(value, str) and (_reads_as_number(value) or "\n" in value))):
            data[key] = value
        else:
            kvp[key] = value
    return kvp, data


def _reads_as_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return text.strip().lower() in ("true", "false")


def check_output(path: str | os.PathLike, *, overwrite: bool = False, resume: bool | None = False,
                 what: str = "output") -> None:
    """Refuse, before any slow work, an output that exists (without ``overwrite`` or
    ``resume``) or whose folder is missing or not writable.

    Raises
    ------
    FileExistsError, FileNotFoundError, PermissionError
        One line saying what is wrong and which option would do what was meant.
    """
    if is_db_url(str(path)):
        return
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder does not exist: {folder}")
    exists = path.exists() or run_record_path(path).exists()
    if exists and not (overwrite or resume):
        again = " or --resume to add what it lacks" if resume is not None else ""
        raise FileExistsError(f"{what} {path} already exists: pass --overwrite to replace it{again}")
    try:  # root ignores permission bits: only a real write tells
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".crystal-llm-check-"):
            pass
    except OSError as err:
        raise PermissionError(f"cannot write into {folder}: {err.strerror or err}") from None


def is_cif_archive(path: str | os.PathLike) -> bool:
    """True for an output that is one CIF per crystal: a ``.zip`` file or a folder (``dir/``)."""
    text = str(path)
    return text.lower().endswith(".zip") or text.endswith(("/", os.sep)) or Path(text).is_dir()


def write_cif_archive(images: Iterable[Atoms], path: str | os.PathLike) -> list[str]:
    """One CIF per crystal (pymatgen's ``CifWriter``), as the input of outside benchmarks
    (LeMat-GenBench, MatterGen's ``mattergen-evaluate``): a ``.zip`` file or a folder.

    Files are named ``<index>_<reduced formula>.cif`` (index from 0, zero-padded) and
    written under a temporary name first, so an interrupted export leaves nothing.

    Returns
    -------
    list of str
        The file names, in input order.
    """
    import zipfile

    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.cif import CifWriter

    images = list(images)
    width = max(5, len(str(len(images) - 1)))
    names, texts = [], []
    for i, atoms in enumerate(images):
        structure = AseAtomsAdaptor.get_structure(atoms)
        names.append(f"{i:0{width}d}_{structure.composition.reduced_formula}.cif")
        texts.append(str(CifWriter(structure)))
    path = Path(str(path).rstrip("/" + os.sep))
    staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
    if path.suffix.lower() == ".zip":
        with zipfile.ZipFile(staging, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, text in zip(names, texts):
                archive.writestr(name, text)
    else:
        staging.mkdir()
        for name, text in zip(names, texts):
            (staging / name).write_text(text)
    if path.is_dir():
        import shutil

        shutil.rmtree(path)  # only reached with --overwrite (check_output refuses otherwise)
    os.replace(staging, path)
    return names


def run_record_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".run.json")


def read_run_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The run records stored beside ``path`` (a database server: in its metadata; empty list when none)."""
    if is_db_url(path):
        import ase.db

        return ase.db.connect(path).metadata.get("runs", [])
    side = run_record_path(path)
    if not side.exists():
        return []
    return json.loads(side.read_text()).get("runs", [])


def _record_key(record):
    return record.get("run_id"), record.get("rank"), record.get("session")


def write_run_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Add or update (same ``run_id``, ``rank`` and ``session``) a run record beside ``path``, atomically."""
    runs = [r for r in read_run_records(path) if _record_key(r) != _record_key(record)]
    runs.append(record)
    atomic_write(run_record_path(path), json.dumps({"runs": runs}, indent=1, default=str) + "\n")


class _TextBackend:
    """Text formats: one structure = one chunk written in a single call."""

    def __init__(self, path, append):
        self.path = Path(path)
        self.seen = set()
        if append and self.path.exists():
            self._repair_and_scan()
        self.fd = open(self.path, "a" if append else "w", encoding="utf-8")

    # Subclasses: chunks(text) -> list of (chunk, identifier or None); render(atoms) -> str.
    def _repair_and_scan(self):
        text = self.path.read_text(encoding="utf-8")
        good = []
        for chunk in self.chunks(text):
            ident = self.parse(chunk)
            if ident is False:  # an unreadable (half-written) tail: cut it off
                break
            good.append(chunk)
            if ident is not None:
                self.seen.add(ident)
        self.n_kept = len(good)
        kept = "".join(good)
        if kept != text:
            warnings.warn(f"{self.path}: dropped an incomplete structure at the end of the file", stacklevel=2)
            atomic_write(self.path, kept)

    def write(self, atoms):
        self.fd.write(self.render(atoms))
        fsync(self.fd)

    def close(self):
        self.fd.close()


class _ExtxyzBackend(_TextBackend):
    def render(self, atoms):
        atoms = atoms.copy()
        for key, value in list(atoms.info.items()):
            # extxyz comment lines are single lines (generated_text is one line already).
            if isinstance(value, str) and "\n" in value:
                atoms.info[key] = value.replace("\n", LINE_SEPARATOR)
            elif isinstance(value, dict):
                del atoms.info[key]
        buf = io.StringIO()
        from ase.io import write

        write(buf, atoms, format="extxyz")
        return buf.getvalue()

    def chunks(self, text):
        lines = text.splitlines(keepends=True)
        out, i = [], 0
        while i < len(lines):
            try:
                n = int(lines[i].strip())
            except ValueError:
                out.append("".join(lines[i:]))
                break
            out.append("".join(lines[i:i + n + 2]))
            i += n + 2
        return out

    def parse(self, chunk):
        from ase.io import read

        lines = chunk.splitlines(keepends=True)
        if not chunk.endswith("\n") or not lines[0].strip().isdigit() or len(lines) != int(lines[0]) + 2:
            return False  # cut short, even if what is there would parse
        try:
            atoms = read(io.StringIO(chunk), format="extxyz")
        except Exception:
            return False
        return identifier(atoms.info)


class _CifBackend(_TextBackend):
    def render(self, atoms):
        buf = io.BytesIO()  # ASE's CIF writer writes bytes
        from ase.io import write

        write(buf, atoms, format="cif")
        text = buf.getvalue().decode("utf-8")
        ident = identifier(atoms.info)
        name = "_".join(map(str, ident)) if ident else atoms.get_chemical_formula()
        tags = "".join(f"_crystal_llm_{k} {atoms.info[k]}\n" for k in ID_KEYS if k in atoms.info)
        # Unique block names and the identifiers as CIF data items.
        text = re.sub(r"^data_\S*\n", lambda m: f"data_{name}\n{tags}", text, count=1, flags=re.M)
        # The end marker (a CIF comment) tells a complete block from one cut short.
        return text + CIF_END

    def chunks(self, text):
        starts = [m.start() for m in re.finditer(r"^data_", text, flags=re.M)]
        if not starts:
            return [text] if text.strip() else []
        head = [text[: starts[0]]] if starts[0] else []
        return head + [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]

    def parse(self, chunk):
        from ase.io import read

        if not chunk.startswith("data_"):
            return None if not chunk.strip() else False
        if not chunk.endswith(CIF_END):
            return False
        try:
            read(io.StringIO(chunk), format="cif")
        except Exception:
            return False
        found = dict(re.findall(r"^_crystal_llm_(\w+) (\S+)$", chunk, flags=re.M))
        return identifier(found) if found else None


class _CrystalTextBackend(_TextBackend):
    """Crystal text has no room for identifiers: they go to ``<path>.ids``, one line each."""

    def __init__(self, path, append):
        self.ids_path = Path(str(path) + ".ids")
        self.n_kept = 0
        super().__init__(path, append)
        if append and self.ids_path.exists():
            # One line per structure ("- - -" without identifiers): keep the
            # lines of the structures that survived in the text file.
            lines = self.ids_path.read_text().splitlines()[: self.n_kept]
            atomic_write(self.ids_path, "".join(line + "\n" for line in lines))
            for line in lines:
                parts = line.split()
                if len(parts) == 3 and parts[0] != "-":
                    self.seen.add((parts[0], int(parts[2])))
        self.ids = open(self.ids_path, "a" if append else "w", encoding="utf-8")

    def render(self, atoms):
        return atoms_to_text(atoms) + "\n\n"

    def chunks(self, text):
        blocks = [block + "\n\n" for block in split_crystals(text)]
        if blocks and not text.endswith("\n\n"):
            blocks[-1] = blocks[-1][:-2]  # no separator yet: cut short
        return blocks

    def parse(self, chunk):
        if not chunk.endswith("\n\n"):
            return False
        try:
            text_to_atoms(chunk)
        except Exception:
            return False
        return None

    def write(self, atoms):
        super().write(atoms)
        if identifier(atoms.info):
            line = " ".join(str(atoms.info.get(k, 0)) for k in ID_KEYS)
        else:
            line = "- - -"
        self.ids.write(line + "\n")
        fsync(self.ids)

    def close(self):
        super().close()
        self.ids.close()


class _TrajBackend:
    def __init__(self, path, append):
        from ase.io import Trajectory

        self.seen = set()
        if append and Path(path).exists():
            with Trajectory(path) as old:
                for atoms in old:
                    ident = identifier(atoms.info)
                    if ident:
                        self.seen.add(ident)
        self.traj = Trajectory(path, "a" if append else "w")

    def write(self, atoms):
        calc = _stored_results(atoms)
        atoms = atoms.copy()
        atoms.calc = calc
        atoms.info = {k: plain(v) for k, v in atoms.info.items()}
        self.traj.write(atoms)
        fd = getattr(self.traj.backend, "fd", None)
        if fd is not None and hasattr(fd, "fileno"):
            fsync(fd)

    def close(self):
        self.traj.close()


def connect_database(address: str | os.PathLike, **kwargs: Any) -> Database:
    """``ase.db.connect`` for appending, safe with several writers on one PostgreSQL server
    and after a writer was killed; ``kwargs`` go to ``ase.db.connect`` (e.g. ``type="db"``)."""
    import ase.db

    # The database locks its own writes (SQLite, PostgreSQL); ASE's lock file beside a file
    # would outlive a writer killed mid-write and block every later one.
    db = ase.db.connect(str(address), append=True, use_lock_file=False, **kwargs)
    if str(address).lower().startswith(("postgresql://", "postgres://")):
        db.get_last_id = _session_last_id
    return db


def _session_last_id(cur):
    """Id of the row this connection just inserted into ``systems``.

    ase-db-backends reads the sequence's global ``last_value``, so two processes
    writing at once can attach one's species to the other's id (a foreign-key
    error or a wrong row); ``currval`` is private to the session.
    """
    cur.execute("SELECT currval('systems_id_seq')")
    return int(cur.fetchone()[0])


def _stored_results(atoms):
    """A relaxed structure's SinglePointCalculator (energy, forces, stress) to store with it;
    None for a live calculator, which must not be run by a writer."""
    from ase.calculators.singlepoint import SinglePointCalculator

    return atoms.calc if isinstance(atoms.calc, SinglePointCalculator) else None


class _DbBackend:
    def __init__(self, path, append):

        if not append and not is_db_url(path) and Path(path).exists():
            Path(path).unlink()
        self.db = connect_database(path)
        self.seen = set()
        if append:
            for row in self.db.select(columns=["key_value_pairs"], include_data=False):
                ident = identifier(row.key_value_pairs)
                if ident:
                    self.seen.add(ident)

    def write(self, atoms):
        kvp, data = split_info(atoms.info)
        bare = atoms.copy()
        bare.calc = _stored_results(atoms)  # row.energy, `ase db` columns
        bare.info = {}
        self.db.write(bare, key_value_pairs=kvp, data=data)  # one transaction

    def set_metadata(self, record):
        meta = dict(self.db.metadata)
        runs = [r for r in meta.get("runs", []) if _record_key(r) != _record_key(record)]
        meta["runs"] = runs + [json.loads(json.dumps(record, default=str))]
        self.db.metadata = meta

    def close(self):
        pass


_BACKENDS = {
    "extxyz": _ExtxyzBackend,
    "cif": _CifBackend,
    "crystal-text": _CrystalTextBackend,
    "traj": _TrajBackend,
    "db": _DbBackend,
}


class StructureWriter:
    """Write structures to a file one at a time, durably.

    Parameters
    ----------
    path : str or Path
        Output file; the format follows the extension (see :data:`FORMATS`).
    append : bool
        Keep what the file holds and add to it, skipping structures whose
        ``(run_id, rank, sample_index)`` is already there.  Otherwise an
        existing file is replaced.

    Examples
    --------
    >>> with StructureWriter("samples.extxyz") as w:       # doctest: +SKIP
    ...     for atoms in generator.iter_generate(100):
    ...         w.write(atoms)
    """

    def __init__(self, path: str | os.PathLike, append: bool = False) -> None:
        self.path = str(path) if is_db_url(str(path)) else Path(path)
        self.format = output_format(self.path)
        if not is_db_url(self.path) and not self.path.parent.exists():
            raise FileNotFoundError(f"output folder does not exist: {self.path.parent}")
        self.append = bool(append)
        self._backend = _BACKENDS[self.format](self.path, self.append)
        self.written = 0
        self.skipped = 0

    @property
    def existing(self) -> set[tuple[str, int]]:
        """Identifiers already in the file when it was opened (``append=True``)."""
        return set(self._backend.seen)

    def write(self, atoms: Atoms) -> bool:
        """Write one structure; returns ``False`` when it was already in the file."""
        ident = identifier(atoms.info)
        if ident is not None and ident in self._backend.seen:
            self.skipped += 1
            return False
        self._backend.write(atoms)
        if ident is not None:
            self._backend.seen.add(ident)
        self.written += 1
        return True

    def write_run_record(self, record: dict[str, Any]) -> None:
        """Store the run record beside the output (and in ase.db metadata)."""
        if not is_db_url(self.path):  # a server keeps its records in the metadata only
            write_run_record(self.path, record)
        if isinstance(self._backend, _DbBackend):
            self._backend.set_metadata(record)

    def close(self) -> None:
        self._backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def merge_outputs(parts: Iterable[str | os.PathLike], path: str | os.PathLike) -> None:
    """Append the structures of per-process part files to ``path``, then delete the parts.

    Text formats are concatenated as written (identifiers and all); ``.traj``
    and ``.db`` rows are copied with their info, key-value pairs and data.
    Run records of the parts move into ``path``'s record file.
    """
    fmt = output_format(path)
    path = Path(path)
    for part in map(Path, parts):
        if not part.exists():
            continue
        if fmt in ("extxyz", "cif", "crystal-text"):
            with open(path, "ab") as out, open(part, "rb") as src:
                out.write(src.read())
                fsync(out)
            ids = Path(str(part) + ".ids")
            if ids.exists():
                with open(str(path) + ".ids", "ab") as out:
                    out.write(ids.read_bytes())
                    fsync(out)
                ids.unlink()
        elif fmt == "traj":
            from ase.io import Trajectory

            with Trajectory(part) as src, StructureWriter(path, append=True) as w:
                for atoms in src:
                    w.write(atoms)
        else:
            import ase.db

            with ase.db.connect(str(part)) as src, ase.db.connect(str(path), append=True) as dst:
                for row in src.select():
                    dst.write(row.toatoms(), key_value_pairs=row.key_value_pairs, data=row.get("data", {}))
        for record in read_run_records(part):
            write_run_record(path, record)
            if fmt == "db":
                _DbBackend(path, append=True).set_metadata(record)
        run_record_path(part).unlink(missing_ok=True)
        part.unlink()
