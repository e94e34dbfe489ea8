"""Formation energy and energy above the convex hull on the Materials Project scale.

The reference is a set of compositions with formation energies (eV/atom) plus
every element at 0 eV/atom, and elemental chemical potentials (total energy
per atom of each element's lowest MP entry) that turn a total energy into a
formation energy.  ``ReferenceHull.from_mp20`` uses the DFT formation energies
of all 45,229 MP-20 rows and the MP elemental reference entries
(``hull/2023-02-07-mp-elemental-reference-entries.json.gz``).

Phase diagrams are built per chemical system when first queried (a few ms)
and kept in a capped LRU cache; pymatgen's ``PatchedPhaseDiagram`` over the
same entries takes minutes and ~0.6 GB, so it is not used.

A potential's energy is put on the MP2020 scale before anything is compared
(see :func:`mp2020_energy`): raw GGA/GGA+U energies (``energy_scale="mp_raw"``,
M3GNet-MP-2021.2.8) get the ``MaterialsProject2020Compatibility`` correction,
already-corrected ones (``"mp2020"``, CHGNet) are used as they are, anything
else is refused.
"""

from __future__ import annotations

import functools
import gzip
import json
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ase_crystal_llm import settings
from ase_crystal_llm.data.datasets import csv_reader
from ase_crystal_llm.info_keys import ENERGY, ENERGY_SCALE, RELAX_ERROR, RELAX_FAILED

if TYPE_CHECKING:
    import os
    from collections.abc import Iterable, Mapping

    from ase import Atoms
    from pymatgen.analysis.phase_diagram import PhaseDiagram
    from pymatgen.core import Composition
    from pymatgen.entries import Entry

__all__ = [
    "ELEMENTAL_REFERENCES", "LP_ABOVE", "MAX_ELEMENTS", "MP_SCALES", "ReferenceHull", "energy_scale_of",
    "load_elemental_references", "mp2020_correct", "mp2020_energy", "mp_run_parameters",
    "oxidation_state_guess", "total_energy_of",
]


ELEMENTAL_REFERENCES = "2023-02-07-mp-elemental-reference-entries.json.gz"


MP_SCALES = ("mp_raw", "mp2020")


MAX_ELEMENTS = 12  # chemical systems larger than this are not enumerated


# Above this many elements the hull energy comes from a linear program: qhull's facet
# enumeration in pymatgen's PhaseDiagram grows explosively with the dimension (minutes for
# one 9-element sample of a weak model), while the LP gives the same number in milliseconds.
LP_ABOVE = 4


# MP's relax set runs GGA+U when O or F is present with one of these (MPRelaxSet LDAUU).
_U_ANIONS = ("O", "F")


class ReferenceHull:
    """Convex-hull reference with per-chemical-system phase diagrams.

    Parameters
    ----------
    formation_energies : iterable of (entry_id, composition, eV/atom)
        Reference phases in formation-energy space (elements are added at 0).
    chemical_potentials : dict
        Element symbol -> total energy per atom (eV) on the MP2020 scale.
    cache_size : int
        Phase diagrams kept in memory (least recently used dropped first).
    """

    def __init__(self, formation_energies: Iterable[tuple[str | None, str | Composition, float]],
                 chemical_potentials: Mapping[str, float], *, cache_size: int = 512) -> None:
        from pymatgen.core import Composition

        self.chemical_potentials = {str(k): float(v) for k, v in chemical_potentials.items()}
        self._by_system: dict[frozenset, list] = {}
        self._ids: dict[str, tuple] = {}
        count = 0
        for entry_id, composition, eform in formation_energies:
            comp = Composition(composition)
            if not np.isfinite(eform) or comp.num_atoms == 0:
                continue
            system = frozenset(el.symbol for el in comp.elements)
            record = (str(entry_id), comp, float(eform))
            self._by_system.setdefault(system, []).append(record)
            if entry_id is not None:
                self._ids[str(entry_id)] = record
            count += 1
        self.n_entries = count
        self.name = "custom"  # what numbers were judged against: recorded with every result
        self.cache_size = int(cache_size)
        self._cache: OrderedDict = OrderedDict()

    # ------------------------------------------------------------------ builders

    @classmethod
    def from_mp20(cls, data_dir: str | os.PathLike | None = None, *, splits: Iterable[str] = ("train", "val", "test"),
                  **kwargs: Any) -> ReferenceHull:
        """All MP-20 rows (train+val+test) plus the MP elemental reference entries.

        Parameters
        ----------
        data_dir : str or path, optional
            Folder holding ``mp_20/`` and ``hull/`` (default: ``settings.data_dir()``).
        """
        data = settings.data_dir(data_dir)
        rows = []
        for split in splits:
            path = settings.mp20_path(split, data)
            with csv_reader(path) as table:
                for row in table:
                    mid, formula = row["material_id"], row["pretty_formula"]
                    rows.append((mid, _row_composition(formula, path, mid), float(row["formation_energy_per_atom"])))
        potentials = load_elemental_references(data / "hull" / ELEMENTAL_REFERENCES)
        hull = cls(rows, potentials, **kwargs)
        hull.name = f"MP-20 ({'+'.join(splits)}) + MP elemental references {ELEMENTAL_REFERENCES.split('-mp-')[0]}"
        return hull

    @classmethod
    def from_entries(cls, entries: Iterable[Entry],
                     elemental_references: Mapping[str, float] | Iterable[Entry] | None = None,
                     **kwargs: Any) -> ReferenceHull:
        """From pymatgen entries whose total energies are on the MP2020 scale.

        Parameters
        ----------
        entries : list of pymatgen Entry (ComputedEntry, PDEntry, ...)
        elemental_references : dict or list of entries, optional
            Chemical potentials (symbol -> eV/atom, or elemental entries); by
            default the lowest-energy elemental entry of each element in ``entries``.
        """
        entries = list(entries)
        if elemental_references is None:
            mu = {}
            for entry in entries:
                if entry.composition.is_element:
                    symbol = entry.composition.elements[0].symbol
                    mu[symbol] = min(mu.get(symbol, np.inf), entry.energy_per_atom)
        elif isinstance(elemental_references, dict):
            mu = {str(k): float(v) for k, v in elemental_references.items()}
        else:
            mu = {e.composition.elements[0].symbol: e.energy_per_atom for e in elemental_references}
        rows = []
        for entry in entries:
            entry_id = getattr(entry, "entry_id", None) or getattr(entry, "name", None)
            missing = [el.symbol for el in entry.composition.elements if el.symbol not in mu]
            if missing:
                raise ValueError(f"no elemental reference for {', '.join(missing)} (entry {entry_id})")
            eform = entry.energy - sum(mu[el.symbol] * n for el, n in entry.composition.items())
            rows.append((entry_id, entry.composition, eform / entry.composition.num_atoms))
        return cls(rows, mu, **kwargs)

    # ------------------------------------------------------------------ queries

    def formation_energy(self, atoms: Atoms, energy: float | None = None, *, energy_scale: str | None = None) -> float:
        """Formation energy (eV/atom) against the elemental chemical potentials.

        Parameters
        ----------
        atoms : ase.Atoms
            Relaxed structure; its ``info[ENERGY_SCALE]`` (written by
            ``calculators.relax``) says how to read the energy.
        energy : float, optional
            Total energy in eV (default: ``info[ENERGY]`` or the attached calculator's).
        energy_scale : str, optional
            Overrides the scale recorded on ``atoms``.
        """
        total = mp2020_energy(atoms, energy, energy_scale)
        counts = _counts(atoms)
        missing = [el for el in counts if el not in self.chemical_potentials]
        if missing:
            raise ValueError(f"no elemental reference energy for {', '.join(sorted(missing))}")
        reference = sum(self.chemical_potentials[el] * n for el, n in counts.items())
        return (total - reference) / len(atoms)

    def e_above_hull(self, atoms: Atoms, energy: float | None = None, exclude: str | Composition | None = None, *,
                     energy_scale: str | None = None) -> float:
        """Energy above the hull (eV/atom; negative when below it).

        Parameters
        ----------
        atoms, energy, energy_scale
            As for :meth:`formation_energy`.
        exclude : str or Composition, optional
            A material id, or a composition (all its polymorphs), left out of the
            reference: "is this known material recovered as (meta)stable?".
        """
        return self.e_above_hull_from_formation(
            _formula(atoms), self.formation_energy(atoms, energy, energy_scale=energy_scale), exclude=exclude
        )

    def e_above_hull_from_formation(self, composition: str | Composition, formation_energy: float,
                                    exclude: str | Composition | None = None) -> float:
        """Energy above hull of a composition with a given formation energy (eV/atom)."""
        from pymatgen.analysis.phase_diagram import PDEntry
        from pymatgen.core import Composition

        comp = Composition(composition)
        system = frozenset(el.symbol for el in comp.elements)
        if len(system) > LP_ABOVE:
            return float(formation_energy - self.hull_energy(comp, exclude=exclude))
        diagram = self.phase_diagram(system, exclude=exclude)
        entry = PDEntry(comp, formation_energy * comp.num_atoms)
        _, e_hull = diagram.get_decomp_and_e_above_hull(entry, allow_negative=True)
        return float(e_hull)

    def phase_diagram(self, elements: Iterable[str], exclude: str | Composition | None = None) -> PhaseDiagram:
        """The pymatgen PhaseDiagram of a chemical system (cached unless ``exclude``)."""
        system = frozenset(str(el) for el in elements)
        if len(system) > MAX_ELEMENTS:
            raise ValueError(f"chemical system with {len(system)} elements is too large for the hull "
                             f"(max {MAX_ELEMENTS})")
        if exclude is None and system in self._cache:
            self._cache.move_to_end(system)
            return self._cache[system]
        diagram = self._build(system, _exclusion(exclude))
        if exclude is None:
            self._cache[system] = diagram
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return diagram

    def hull_energy(self, composition: str | Composition, exclude: str | Composition | None = None) -> float:
        """Formation energy of the lower convex hull at ``composition`` (eV/atom).

        The cheapest mix of the system's entries (elements at 0) with the
        composition's atomic fractions, as a linear program: the same value
        as the pymatgen ``PhaseDiagram`` hull, without enumerating its facets.
        """
        from pymatgen.core import Composition
        from scipy.optimize import linprog

        comp = Composition(composition)
        elements = sorted(el.symbol for el in comp.elements)
        skip = _exclusion(exclude)
        fractions = [np.eye(len(elements))[i] for i in range(len(elements))]
        energies = [0.0] * len(elements)
        for entry_id, entry_comp, eform in self._entries_within(frozenset(elements)):
            if not skip(entry_id, entry_comp):
                fractions.append([entry_comp.get_atomic_fraction(el) for el in elements])
                energies.append(eform)
        target = [comp.get_atomic_fraction(el) for el in elements]
        result = linprog(energies, A_eq=np.array(fractions).T, b_eq=target, bounds=(0, None), method="highs")
        if not result.success:
            raise ValueError(f"no hull energy for {comp.reduced_formula}: {result.message}")
        return float(result.fun)

    def _entries_within(self, system):
        for subsystem, records in self._by_system.items():
            if subsystem <= system:
                yield from records

    def _build(self, system, skip):
        from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
        from pymatgen.core import Composition

        entries = [PDEntry(Composition(el), 0.0, name=el) for el in sorted(system)]
        for entry_id, comp, eform in self._entries_within(system):
            if not skip(entry_id, comp):
                entries.append(PDEntry(comp, eform * comp.num_atoms, name=entry_id))
        return PhaseDiagram(entries)

    def __len__(self):
        return self.n_entries

    def __repr__(self):
        return f"ReferenceHull({self.n_entries} entries, {len(self.chemical_potentials)} elements)"


def load_elemental_references(path: str | os.PathLike) -> dict[str, float]:
    """Element -> energy per atom (eV) from a gzipped JSON of ComputedEntry dicts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"elemental reference entries not found: {path}")
    with gzip.open(path, "rt") as handle:
        entries = json.load(handle)
    mu = {}
    for symbol, entry in entries.items():
        natoms = sum(entry["composition"].values())
        correction = entry.get("correction", 0.0) or 0.0
        mu[symbol] = (entry["energy"] + correction) / natoms
    return mu


def energy_scale_of(atoms: Atoms, energy_scale: str | None = None) -> str:
    """The energy scale recorded on ``atoms`` (info, then its calculator)."""
    scale = energy_scale or atoms.info.get(ENERGY_SCALE) or getattr(atoms.calc, "energy_scale", None)
    if scale is None:
        raise ValueError(
            "energy of unknown scale: relax with calculators.relax/relax_many (which record "
            "info[ENERGY_SCALE]) or pass energy_scale='mp_raw' or 'mp2020'"
        )
    if scale not in MP_SCALES:
        raise ValueError(
            f"energy scale {scale!r} cannot be compared with the Materials Project hull "
            f"(only {', '.join(MP_SCALES)}; MatPES and other-functional potentials are not MP-compatible)"
        )
    return scale


def total_energy_of(atoms: Atoms, energy: float | None = None) -> float:
    """Total energy (eV): the argument, else ``info[ENERGY]``, else the calculator's."""
    if energy is not None:
        return float(energy)
    if ENERGY in atoms.info:
        return float(atoms.info[ENERGY])
    if atoms.calc is None:
        raise ValueError("no energy: pass energy=, or relax the structure first")
    return float(atoms.get_potential_energy())


def mp2020_energy(atoms: Atoms, energy: float | None = None, energy_scale: str | None = None) -> float:
    """Total energy (eV) of ``atoms`` on the MP2020-corrected scale.

    ``"mp2020"`` energies are returned unchanged (never corrected twice);
    ``"mp_raw"`` energies get ``MaterialsProject2020Compatibility`` with the run
    type and U values of MP's relax set.

    Raises
    ------
    ValueError
        Unknown scale, or a structure the MP2020 scheme rejects.
    """
    if atoms.info.get(RELAX_FAILED):
        raise ValueError(f"relaxation failed, no energy: {atoms.info.get(RELAX_ERROR, 'unknown error')}")
    scale = energy_scale_of(atoms, energy_scale)
    total = total_energy_of(atoms, energy)
    if not np.isfinite(total):
        raise ValueError(f"energy is not finite: {total}")
    if scale == "mp2020":
        return total
    return mp2020_correct(atoms, total)


def mp_run_parameters(symbols: Iterable[str]) -> dict[str, Any]:
    """Run type and Hubbard U values MP's relax set uses for these elements."""
    from pymatgen.io.vasp.sets import MPRelaxSet

    symbols = set(symbols)
    table = MPRelaxSet.CONFIG["INCAR"]["LDAUU"]
    anion = next((a for a in _U_ANIONS if a in symbols), None)
    hubbards = {}
    if anion is not None:
        hubbards = {el: u for el, u in table[anion].items() if el in symbols and u}
    if hubbards:
        return {"run_type": "GGA+U", "is_hubbard": True, "hubbards": hubbards}
    return {"run_type": "GGA", "is_hubbard": False, "hubbards": {}}


def mp2020_correct(atoms: Atoms, total_energy: float) -> float:
    """Raw GGA/GGA+U total energy -> MP2020-corrected total energy (eV)."""
    from pymatgen.entries.compatibility import CompatibilityError
    from pymatgen.entries.computed_entries import ComputedStructureEntry
    from pymatgen.io.ase import AseAtomsAdaptor

    structure = AseAtomsAdaptor.get_structure(atoms)
    entry = ComputedStructureEntry(
        structure,
        float(total_energy),
        parameters=mp_run_parameters(structure.symbol_set),
        data={"oxidation_states": oxidation_state_guess(structure.composition)},
        entry_id="query",
    )
    compat = _compatibility()
    try:
        with warnings.catch_warnings():
            # intermetallics: pymatgen (as MP) puts the anion correction on the most electronegative atom
            warnings.filterwarnings("ignore", message="Failed to guess oxidation states")
            processed = compat.process_entry(entry, on_error="raise")
    except CompatibilityError as err:
        raise ValueError(f"MP2020 correction failed for {structure.composition.reduced_formula}: {err}") from err
    if processed is None:
        raise ValueError(
            f"MP2020 correction rejected {structure.composition.reduced_formula} (run type or U values inconsistent)"
        )
    return float(processed.energy)


_OXIDATION_STATES: OrderedDict = OrderedDict()


def oxidation_state_guess(composition: Composition, cache_size: int = 4096) -> dict[str, float]:
    """What MP2020 guesses when an entry has no oxidation states, cached per formula.

    Same call as pymatgen's ``MaterialsProject2020Compatibility`` (first guess of
    ``oxi_state_guesses(max_sites=-20)``, ``{}`` when none); it can take seconds
    for four-element compositions and generated samples repeat formulas.
    """
    key = composition.reduced_formula
    if key not in _OXIDATION_STATES:
        try:
            guesses = composition.reduced_composition.oxi_state_guesses(max_sites=-20)
        except ValueError:
            guesses = ()
        _OXIDATION_STATES[key] = dict(guesses[0]) if guesses else {}
        if len(_OXIDATION_STATES) > cache_size:
            _OXIDATION_STATES.popitem(last=False)
    return dict(_OXIDATION_STATES[key])


@functools.cache  # built once: pymatgen reads its correction tables on construction
def _compatibility():
    from pymatgen.entries.compatibility import MaterialsProject2020Compatibility

    return MaterialsProject2020Compatibility(check_potcar=False)


def _counts(atoms):
    symbols, counts = np.unique(atoms.get_chemical_symbols(), return_counts=True)
    return dict(zip(symbols.tolist(), counts.tolist()))


def _formula(atoms):
    return " ".join(f"{el}{n}" for el, n in _counts(atoms).items())


def _row_composition(formula, path, material_id):
    """Composition of an MP-20 row: its pretty_formula, else its CIF (rare)."""
    from pymatgen.core import Composition, Structure

    if isinstance(formula, str) and formula:
        try:
            return Composition(formula)
        except (ValueError, KeyError):
            pass
    with csv_reader(path) as table:
        cif = next(row["cif"] for row in table if row["material_id"] == material_id)
    return Structure.from_str(cif, fmt="cif").composition


def _exclusion(exclude):
    """A predicate (entry_id, composition) -> bool for the entries to leave out."""
    if exclude is None:
        return lambda entry_id, comp: False
    from pymatgen.core import Composition

    if isinstance(exclude, str) and not _looks_like_formula(exclude):
        return lambda entry_id, comp: entry_id == exclude
    reduced = Composition(exclude).reduced_formula
    return lambda entry_id, comp: comp.reduced_formula == reduced


def _looks_like_formula(text):
    from pymatgen.core import Composition

    if text.startswith(("mp-", "mvc-", "agm")) or "-" in text:
        return False
    try:
        Composition(text)
    except (ValueError, KeyError):
        return False
    return True
