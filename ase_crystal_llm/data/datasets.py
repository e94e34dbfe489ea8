"""Read crystal structures and their properties from datasets.

Three kinds of source, chosen by the name:

* CDVAE-style tables (``*.csv``, ``*.csv.gz``): one crystal per row in a ``cif``
  column, every other column a property (MP-20: ``material_id``,
  ``formation_energy_per_atom``, ``band_gap``, ``pretty_formula``,
  ``e_above_hull``, ``spacegroup.number``);
* ASE databases (``*.db`` or a ``postgresql://`` URL): ``key_value_pairs`` become
  properties;
* anything else ``ase.io.read`` understands, a single file or a glob
  (``*.cif`` files go through pymatgen's CIF parser, like the CSV column).

Properties land in ``atoms.info`` under ase.db-safe names (``spacegroup.number``
becomes ``spacegroup_number``); missing values (empty, NaN) are left out, never
set to zero.  Oxidation-state species (``Fe2+``) become plain elements.
Partially occupied sites are an error unless ``order_disordered=True``, which
gives every site its majority occupant (see :func:`order_sites`).

By default every structure is put into one cell convention,
:func:`canonicalize` (primitive, Niggli-reduced), so training, validation,
test and prompts all see the same kind of cell.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import gzip
import math
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from ase import Atoms

from ase_crystal_llm.info_keys import ENERGY
from ase_crystal_llm.text.format import is_periodic

if TYPE_CHECKING:
    from collections.abc import Iterable

    from pymatgen.core import Structure

__all__ = [
    "CANONICAL_CELL",
    "DatasetError",
    "canonicalize",
    "csv_column",
    "csv_reader",
    "iter_structures",
    "order_sites",
    "property_name",
    "read_structures",
    "select_mp20",
]


#: The cell convention recorded with trained models.
CANONICAL_CELL = "primitive-niggli"


# Columns that describe the structure itself rather than a property of it.
_STRUCTURE_COLUMNS = {"cif", "elements", "", "Unnamed: 0", "index"}


# Columns kept as text even when a value looks like a number ("NaN" is a formula).
_TEXT_COLUMNS = {"material_id", "pretty_formula", "formula", "reduced_formula", "id", "name", "mp_id"}


_MISSING = {"", "nan", "none", "null", "na", "n/a"}


_INT = re.compile(r"[+-]?\d+")


_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:inf|infinity)", re.IGNORECASE)


# Info keys that scale with the number of atoms in the cell.
_EXTENSIVE_INFO = ("energy", "free_energy")


# Cell parameters (Angstrom, degrees) this close count as the same cell.
_SAME_CELLPAR = 1e-5


# Rows named in a skip warning before "...".
_MAX_LISTED = 20


class DatasetError(ValueError):
    """A structure that cannot be read; the message names its row and the reason."""


def property_name(column: str) -> str:
    """The ``atoms.info`` key for a table column: ase.db-safe (``spacegroup.number`` -> ``spacegroup_number``)."""
    name = re.sub(r"\W", "_", column.strip())
    return "_" + name if name[:1].isdigit() else name


def _parse_value(column, text):
    """A table cell as int, float or str; None when missing (NaN stays missing)."""
    text = text.strip()
    if column in _TEXT_COLUMNS:
        return text or None
    if text.lower() in _MISSING:
        return None
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        value = float(text)
        return value if math.isfinite(value) else None
    return text


def _is_missing(value):
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def order_sites(structure: Structure) -> Structure:
    """Order a disordered pymatgen structure: every site takes its majority occupant.

    The vacancy (``1 - total occupancy``) counts as an occupant, so a site that
    is mostly empty is removed.  Ties go to the species listed first.  This is
    deterministic and keeps the cell; it does not search for the lowest-energy
    ordering (pymatgen's ``OrderDisorderedStructureTransformation`` does that,
    at the cost of oxidation states and an enumeration per structure).
    """
    from pymatgen.core import Structure

    species, coords = [], []
    for site in structure:
        occupants = list(site.species.items())
        best, occupancy = max(occupants, key=lambda item: item[1])
        vacancy = 1.0 - sum(occ for _, occ in occupants)
        if vacancy > occupancy:
            continue
        species.append(best)
        coords.append(site.frac_coords)
    if not species:
        raise DatasetError("every site is mostly vacant")
    return Structure(structure.lattice, species, coords)


def _describe_site(site):
    return ", ".join(f"{el}:{occ:.3g}" for el, occ in site.species.items())


def _structure_to_atoms(structure, order_disordered):
    """pymatgen Structure -> Atoms with plain elements; disorder rejected or ordered."""
    structure = structure.copy()
    structure.remove_oxidation_states()
    if not structure.is_ordered:
        if not order_disordered:
            index, site = next((i, s) for i, s in enumerate(structure) if not s.is_ordered)
            raise DatasetError(
                f"partially occupied site {index} ({_describe_site(site)}): "
                "disordered structures need order_disordered=True (majority occupant per site)"
            )
        structure = order_sites(structure)
    return Atoms(
        symbols=[site.specie.symbol for site in structure],
        cell=structure.lattice.matrix,
        scaled_positions=structure.frac_coords,
        pbc=True,
    )


def _parse_cif(text):
    """All structures in a CIF string, parsed by pymatgen (no symmetry reduction)."""
    from pymatgen.io.cif import CifParser

    with warnings.catch_warnings():
        # Routine notes (coordinates snapped to ideal values, noble gases without
        # electronegativity when sites are sorted) are not problems of the data.
        warnings.filterwarnings("ignore", message=r"(?s).*rounded to ideal values")
        warnings.filterwarnings("ignore", message="No Pauling electronegativity")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pymatgen\.io\.cif")
        parser = CifParser.from_str(text)
        return parser.parse_structures(primitive=False, on_error="raise")


def _atoms_from_cif(text, order_disordered):
    if not isinstance(text, str) or not text.strip():
        raise DatasetError("empty cif")
    try:
        structures = _parse_cif(text)
    except DatasetError:
        raise
    except Exception as err:  # pymatgen raises many kinds for broken CIFs
        raise DatasetError(f"cif does not parse: {_one_line(err)}") from err
    if len(structures) != 1:
        raise DatasetError(f"cif holds {len(structures)} structures, expected 1")
    return _structure_to_atoms(structures[0], order_disordered)


def canonicalize(atoms: Atoms, *, tolerance: float = 0.25) -> Atoms:
    """The primitive, Niggli-reduced cell of a crystal (the package's one cell convention).

    Uses pymatgen's ``get_primitive_structure`` (site tolerance ``tolerance`` in
    Angstrom, its default) and ``get_reduced_structure`` (Niggli), as CDVAE and
    MatterGen did for MP-20.  A cell that is already primitive and
    Niggli-reduced comes back unchanged (same cell, same atom order).

    ``atoms.info`` is kept; extensive entries (``energy``, ``free_energy``) are
    scaled to the new number of atoms.  Per-atom arrays other than positions
    and numbers, constraints and the calculator are dropped, since a smaller
    cell has no one-to-one map onto them.

    Raises
    ------
    ValueError
        If the structure is not periodic in 3D.
    """
    from pymatgen.core import Lattice, Structure

    if not is_periodic(atoms):
        raise ValueError("canonicalize needs a crystal periodic in 3D (full cell, pbc=True)")
    structure = Structure(
        Lattice(np.array(atoms.cell)),
        atoms.get_chemical_symbols(),
        atoms.get_scaled_positions(wrap=False),
    )
    with warnings.catch_warnings():
        # pymatgen sorts by electronegativity and warns for noble gases.
        warnings.filterwarnings("ignore", message="No Pauling electronegativity")
        primitive = structure.get_primitive_structure(tolerance=tolerance)
    if len(primitive) == len(structure):
        primitive = structure  # keep the given cell and atom order when nothing shrinks
    reduced = primitive.get_reduced_structure()
    if np.allclose(reduced.lattice.parameters, primitive.lattice.parameters, rtol=0, atol=_SAME_CELLPAR):
        reduced = primitive  # already Niggli-reduced: keep its orientation and coordinates
    frac = reduced.frac_coords % 1.0
    frac[frac > 1.0 - 1e-12] = 0.0  # -1e-17 % 1 is 1 - 1e-17: wrap it to 0
    out = Atoms(
        symbols=[site.specie.symbol for site in reduced],
        cell=reduced.lattice.matrix,
        scaled_positions=frac,
        pbc=True,
    )
    out.info = dict(atoms.info)
    ratio = len(out) / len(atoms)
    for key in _EXTENSIVE_INFO:
        if ratio != 1 and isinstance(out.info.get(key), (int, float)):
            out.info[key] = out.info[key] * ratio
    return out


def _open_text(path):
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


@contextlib.contextmanager
def csv_reader(path: str | os.PathLike) -> Iterator[csv.DictReader]:
    """Rows of a CDVAE-style CSV (MP-20; plain or gzipped) as dicts of text, in file order.

    The one way the package and its benchmarks open such tables: UTF-8, no
    field size limit (CIFs are long fields), every value left as written.

    Examples
    --------
    >>> with csv_reader("mp_20/val.csv.gz") as rows:  # doctest: +SKIP
    ...     formulas = [row["pretty_formula"] for row in rows]
    """
    csv.field_size_limit(sys.maxsize)
    with _open_text(path) as handle:
        yield csv.DictReader(handle)


def csv_column(path: str | os.PathLike, column: str) -> list[str]:
    """One column of a CDVAE-style CSV (see :func:`csv_reader`), as written, in file order."""
    with csv_reader(path) as rows:
        return [row[column] for row in rows]


def _csv_rows(path, order_disordered):
    with csv_reader(path) as reader:
        columns = reader.fieldnames or []
        if "cif" not in columns:
            raise DatasetError(f"{path}: no 'cif' column (columns: {', '.join(columns) or 'none'})")
        properties = [c for c in columns if c not in _STRUCTURE_COLUMNS]
        # Row 1 is the first data row after the header.
        for number, row in enumerate(reader, start=1):
            label = f"{path.name} row {number}"
            if row.get("material_id"):
                label += f" ({row['material_id']})"
            yield label, lambda row=row: _csv_atoms(row, properties, order_disordered)


def _csv_atoms(row, properties, order_disordered):
    if None in row or any(row.get(c) is None for c in properties + ["cif"]):
        raise DatasetError("wrong number of fields")
    atoms = _atoms_from_cif(row["cif"], order_disordered)
    for column in properties:
        value = _parse_value(column, row[column])
        if value is not None:
            atoms.info[property_name(column)] = value
    return atoms


def _energy_to_info(atoms):
    """Copy a stored single-point energy into info[ENERGY] (the package convention)."""
    calc = atoms.calc
    if calc is not None and ENERGY not in atoms.info:
        energy = getattr(calc, "results", {}).get("energy")
        if energy is not None and np.isfinite(energy):
            atoms.info[ENERGY] = float(energy)
    return atoms


def _db_rows(source):
    import ase.db

    with ase.db.connect(str(source)) as db:
        for row in db.select():
            yield f"{Path(str(source)).name} id {row.id}", lambda row=row: _db_atoms(row)


def _db_atoms(row):
    atoms = row.toatoms()
    for key, value in row.key_value_pairs.items():
        if not _is_missing(value):
            atoms.info[key] = value
    return _energy_to_info(atoms)


def _cif_file_rows(path, order_disordered):
    structures = _parse_cif(path.read_text())
    for index, structure in enumerate(structures):
        yield f"{path.name} index {index}", lambda s=structure: _structure_to_atoms(s, order_disordered)


def _ase_rows(path):
    import ase.io

    # index counts from 0, as in ase.io.read(path, index=i).
    for index, atoms in enumerate(ase.io.iread(str(path), index=":")):
        yield f"{path.name} index {index}", lambda atoms=atoms: _ase_atoms(atoms)


def _ase_atoms(atoms):
    atoms.info = {k: v for k, v in atoms.info.items() if not _is_missing(v)}
    return _energy_to_info(atoms)


def _kind(name):
    lower = name.lower()
    if lower.startswith(("postgresql://", "postgres://", "mysql://", "mariadb://")):
        return "db"
    if lower.endswith((".csv", ".csv.gz")):
        return "csv"
    if lower.endswith(".db"):
        return "db"
    if lower.endswith((".cif", ".mcif")):
        return "cif"
    return "ase"


def _file_rows(name, order_disordered):
    kind = _kind(name)
    if kind == "db" and "://" in name:
        return _db_rows(name)
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"structure source not found: {name}")
    if kind == "csv":
        return _csv_rows(path, order_disordered)
    if kind == "db":
        return _db_rows(path)
    if kind == "cif":
        return _guard_file(path, lambda: _cif_file_rows(path, order_disordered))
    return _guard_file(path, lambda: _ase_rows(path))


def _guard_file(path, rows):
    """Items of a whole-file reader; a file that fails to read is one bad item."""
    try:
        yield from rows()
    except Exception as err:
        yield f"{path.name}", _raiser(DatasetError(f"cannot read file: {_one_line(err)}"))


def _raiser(err):
    def make():
        raise err

    return make


def _source_names(source):
    name = os.fspath(source)
    if "://" in name:
        return [name]
    if glob.has_magic(name):
        found = sorted(glob.glob(os.path.expanduser(name)))
        if not found:
            raise FileNotFoundError(f"no files match {name}")
        return found
    return [os.path.expanduser(name)]


def _one_line(err):
    text = str(err).strip() or type(err).__name__
    return " ".join(text.split())


def iter_structures(source: str | os.PathLike, *, canonical: bool = True, limit: int | None = None,
                    skip_bad: bool = False, order_disordered: bool = False,
                    rows: Iterable[int] | None = None) -> Iterator[Atoms]:
    """Stream crystals with their properties from a dataset; see :func:`read_structures`."""
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer, got {limit!r}")
    wanted = None if rows is None else {int(i) for i in rows}
    names = _source_names(source)
    for name in names:  # fail on a missing file before reading anything
        if "://" not in name and not Path(name).is_file():
            raise FileNotFoundError(f"structure source not found: {name}")
    skipped = []
    count = 0
    try:
        position = -1  # row index over all sources
        for name in names:
            for where, make in _file_rows(name, order_disordered):
                position += 1
                if wanted is not None and position not in wanted:
                    continue  # not parsed at all
                if limit is not None and count >= limit:
                    return
                try:
                    atoms = make()
                    if canonical:
                        atoms = canonicalize(atoms)
                except Exception as err:
                    reason = _one_line(err)
                    if not skip_bad:
                        raise DatasetError(f"{where}: {reason}") from err
                    skipped.append((where, reason))
                    continue
                count += 1
                yield atoms
    finally:
        if skipped:
            _warn_skipped(skipped)


def _warn_skipped(skipped):
    listed = "; ".join(where for where, _ in skipped[:_MAX_LISTED])
    more = f"; ... ({len(skipped) - _MAX_LISTED} more)" if len(skipped) > _MAX_LISTED else ""
    warnings.warn(
        f"skipped {len(skipped)} unreadable structure(s): {listed}{more}; first reason: {skipped[0][1]}",
        stacklevel=3,
    )


def read_structures(source: str | os.PathLike, *, canonical: bool = True, limit: int | None = None,
                    skip_bad: bool = False, order_disordered: bool = False,
                    rows: Iterable[int] | None = None) -> list[Atoms]:
    """Read crystals with their properties into a list of ``ase.Atoms``.

    Parameters
    ----------
    source : str or path-like
        A CSV / CSV.GZ with a ``cif`` column (CDVAE style), an ASE database
        (``.db`` or a server URL), or any file or glob that ``ase.io.read``
        understands (``.extxyz``, ``.traj``, ``.cif``, ``.crystxt``, ...).
    canonical : bool
        Put every cell into the primitive, Niggli-reduced convention
        (:func:`canonicalize`).  On by default so that every split agrees.
    limit : int, optional
        Stop after this many structures.
    skip_bad : bool
        Skip structures that cannot be read and report them in one warning
        (count, rows and the first reason) instead of raising.
    order_disordered : bool
        Order partially occupied sites (majority occupant per site,
        :func:`order_sites`) instead of rejecting them.
    rows : iterable of int, optional
        Read only these rows (0-based, over all sources in order); the others
        are not parsed, so a subsample of a large split reads fast.

    Returns
    -------
    list of ase.Atoms
        Periodic structures; properties in ``atoms.info`` (missing values absent).

    Raises
    ------
    FileNotFoundError
        If the source (or every file of a glob) does not exist.
    DatasetError
        For a structure that cannot be read, naming its row (CSV rows count
        from 1 after the header, database rows by id, file items by their
        ``ase.io`` index from 0).
    """
    return list(
        iter_structures(
            source, canonical=canonical, limit=limit, skip_bad=skip_bad, order_disordered=order_disordered,
            rows=rows,
        )
    )


def select_mp20(query: str, splits: Iterable[str] = ("train", "val", "test"),
                data_dir: str | os.PathLike | None = None) -> list[Atoms]:
    """MP-20 crystals of one reduced formula (``"SrTiO3"``) or one chemical system (``"Sr-Ti-O"``).

    A chemical system selects the rows made of exactly those elements.  The
    rows keep their CSV properties (``material_id``, ...) and are read as
    stored (not canonicalised).  ``splits`` are looked up in ``data_dir``
    (:func:`settings.data_dir`).
    """
    from ase.data import chemical_symbols
    from pymatgen.core import Composition

    from ase_crystal_llm import settings

    parts = [p.strip() for p in query.split("-")]
    system = formula = None
    if len(parts) > 1 and all(p in chemical_symbols[1:] for p in parts):
        system = frozenset(parts)
    elif len(parts) == 1:
        with contextlib.suppress(Exception):
            comp = Composition(query)
            if all(el.symbol in chemical_symbols[1:] for el in comp.elements):
                formula = comp.reduced_formula
    if system is None and formula is None:
        raise ValueError(f"{query!r} is neither a file, a formula nor a chemical system like Sr-Ti-O")
    found = []
    data = settings.data_dir(data_dir)
    for split in splits:
        path = settings.mp20_path(split, data)
        rows = []
        with csv_reader(path) as table, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pymatgen: "no Pauling electronegativity for He"
            for i, row in enumerate(table):
                comp = Composition(row["pretty_formula"])
                hit = (comp.reduced_formula == formula if formula
                       else frozenset(el.symbol for el in comp.elements) == system)
                if hit:
                    rows.append(i)
        if rows:
            found += read_structures(path, canonical=False, rows=rows)
    if not found:
        raise ValueError(f"no MP-20 crystal ({'+'.join(splits)}) has the "
                         f"{'formula' if formula else 'chemical system'} {query}")
    return found
