"""Sample metrics of CDVAE (Xie et al., 2022) and Gruver et al. (ICLR 2024).

Every metric is a small function over a list of structures (``ase.Atoms`` or
pymatgen ``Structure``); :func:`~.pipeline.evaluate` strings them together.
Validity itself is in :mod:`ase_crystal_llm.chemistry.validity` (decoding
uses it too).  Definitions:

* **coverage** recall / precision: CrystalNN structure fingerprints and Magpie
  composition features (standardised) within 0.4 and 10 of a reference crystal;
* **Wasserstein distances** of density and number of elements to a reference;
* **novelty** / **uniqueness**: no pymatgen ``StructureMatcher`` match in the
  training set / among the other samples; **diversity**: mean pairwise
  fingerprint distance;
* **stability**: metastable (E_hull < 0.1 eV/atom), stable (E_hull <= 0) and
  S.U.N. (stable, unique, novel) rates over *all* samples;
* **conditional accuracy**: reduced formula and space group (symprec 0.1 and
  0.2) of samples generated with those conditions.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from ase_crystal_llm import settings
from ase_crystal_llm.chemistry.validity import _mean, as_atoms, as_structure, reduced_formula, validity_flags
from ase_crystal_llm.info_keys import ATTEMPTS, CONDITIONS, FORMULA_CONSTRAINED
from ase_crystal_llm.text.prompts import spacegroup_names

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from ase import Atoms
    from numpy.typing import ArrayLike
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.core import Structure

__all__ = [
    "COMP_CUTOFF", "COMP_FP_SIZE", "COVERAGE_KEYS", "CompositionScaler", "Featurizer", "Fingerprints", "METASTABLE",
    "NoveltyIndex", "STRUCT_CUTOFF", "STRUCT_FP_SIZE", "SYMPRECS", "conditional_accuracy", "conditions_of",
    "coverage", "crystal_system", "diversity", "emitted_validity", "featurizer", "novelty_flags", "spacegroup_number",
    "stability_rates", "structure_matcher", "structures_match", "unique_flags", "wasserstein",
]


STRUCT_CUTOFF = 0.4  # CrystalNN fingerprint distance (CDVAE, MP-20)


COMP_CUTOFF = 10.0  # standardised Magpie feature distance (CDVAE, MP-20)
COVERAGE_KEYS = ("recall", "precision", "structure_precision", "composition_precision")


METASTABLE = 0.1  # eV/atom


STRUCT_FP_SIZE = 61  # CrystalNN "ops" site fingerprint


COMP_FP_SIZE = 132  # Magpie ElementProperty


SYMPRECS = (0.1, 0.2)


def _attempts(info):
    value = info.get(ATTEMPTS)
    try:
        value = int(value)
    except (TypeError, ValueError):
        return None
    return value if value >= 1 else None


def emitted_validity(structures: Sequence[Atoms | Structure], flags: Mapping[str, Sequence[bool]] | None = None,
                     stats: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]] | None:
    """Validity over everything the model emitted, not only over the returned samples.

    Each returned sample records in ``info[ATTEMPTS]`` how many model outputs
    were spent on it (1 + the failed ones before it); failed outputs count as
    invalid.  Samples are grouped by ``info[FORMULA_CONSTRAINED]`` where
    recorded (``info["constrained"]`` in files written before 0.2).

    Parameters
    ----------
    structures : list
        The returned samples.
    flags : dict, optional
        Their :func:`validity_flags` (computed when not given).
    stats : dict, optional
        Generation statistics of the run that produced exactly these samples
        (``attempts``, ``returned``, ``gave_up``, ``parse_failures``, as in a
        run record); its attempt count also covers requested crystals that
        never parsed, which per-sample records miss.

    Returns
    -------
    dict or None
        ``{"all": {...}, "constrained": {...}, "unconstrained": {...}}`` with
        ``emitted``, ``returned``, and the valid fractions over both; ``None``
        when nothing records the attempts.
    """
    atoms = [as_atoms(s) for s in structures]
    attempts = [_attempts(a.info) for a in atoms]
    if all(x is None for x in attempts) and not stats:
        return None
    if flags is None:
        flags = validity_flags(atoms)
    out = {}
    if stats and int(stats.get("attempts") or 0) > 0:
        emitted = int(stats["attempts"])
        out["all"] = _emitted_entry(range(len(atoms)), emitted, flags)
        out["all"].update(source="run record", gave_up=int(stats.get("gave_up") or 0),
                          parse_failures=int(sum((stats.get("parse_failures") or {}).values())))
    groups = {"all": lambda info: True}
    if any(_constrained(a.info) is not None for a in atoms):
        groups["constrained"] = lambda info: _constrained(info) is True
        groups["unconstrained"] = lambda info: _constrained(info) is False
    for name, member in groups.items():
        idx = [i for i, a in enumerate(atoms) if member(a.info) and attempts[i] is not None]
        if idx and name not in out:
            out[name] = {**_emitted_entry(idx, sum(attempts[i] for i in idx), flags), "source": "samples"}
    return out or None


def _constrained(info):
    """Whether decoding was held to the formula; None when not recorded."""
    for key in (FORMULA_CONSTRAINED, "constrained"):  # "constrained": files written before 0.2
        if key in info:
            return bool(info[key])
    return None


def _emitted_entry(idx, emitted, flags):
    idx = list(idx)
    valid = sum(flags["valid"][i] for i in idx)
    return {
        "emitted": emitted,
        "returned": len(idx),
        "valid_over_emitted": valid / emitted,
        "structure_valid_over_emitted": sum(flags["structure"][i] for i in idx) / emitted,
        "valid_over_returned": valid / len(idx),
    }


# -- fingerprints ----------------------------------------------------------------
class Featurizer:
    """CDVAE's fingerprints: mean CrystalNN site fingerprint ("ops") and Magpie composition features."""

    def __init__(self) -> None:
        settings.require("matminer")
        from matminer.featurizers.composition.composite import ElementProperty
        from matminer.featurizers.site.fingerprint import CrystalNNFingerprint

        self._site = CrystalNNFingerprint.from_preset("ops")
        self._comp = ElementProperty.from_preset("magpie", impute_nan=True)

    def structure(self, structure: Atoms | Structure) -> np.ndarray | None:
        """Mean CrystalNN fingerprint over sites, or ``None`` when CrystalNN fails."""
        structure = as_structure(structure)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sites = [self._site.featurize(structure, i) for i in range(len(structure))]
        except Exception:  # CDVAE counts such a crystal as having no fingerprint
            return None
        fp = np.mean(np.asarray(sites, dtype=float), axis=0)
        return fp if np.isfinite(fp).all() else None

    def composition(self, structure: Atoms | Structure) -> np.ndarray:
        """Magpie composition features (132 values)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(self._comp.featurize(as_structure(structure).composition), dtype=float)


@functools.cache  # one per process (worker processes build their own)
def featurizer() -> Featurizer:
    """This process's :class:`Featurizer`, built on first use (matminer's presets take a few seconds)."""
    return Featurizer()


def _featurize_one(item):
    fz = featurizer()
    return fz.structure(item), fz.composition(item)


def _pool_map(func, items, workers, progress, desc):
    from tqdm.auto import tqdm

    bar = dict(total=len(items), desc=desc, disable=not progress, leave=False)
    if not workers or workers <= 1 or len(items) < 2 * workers:
        return [func(x) for x in tqdm(items, **bar)]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        return list(tqdm(pool.imap(func, items, chunksize=8), **bar))


@dataclass
class Fingerprints:
    """Per-crystal fingerprints and the statistics that coverage and Wasserstein metrics need.

    Attributes
    ----------
    structure : ndarray (n, 61)
        Mean CrystalNN fingerprints; rows of NaN where CrystalNN failed.
    composition : ndarray (n, 132)
        Magpie composition features.
    density : ndarray (n,)
        Mass density, g/cm^3.
    n_elements : ndarray (n,)
        Number of distinct elements.
    """

    structure: np.ndarray
    composition: np.ndarray
    density: np.ndarray
    n_elements: np.ndarray
    _ARRAYS = ("structure", "composition", "density", "n_elements")  # not a field: no annotation

    @classmethod
    def from_structures(cls, structures: Iterable[Atoms | Structure], *, workers: int | None = None,
                        progress: bool = False, desc: str = "fingerprints") -> Fingerprints:
        structures = [as_structure(s) for s in structures]
        pairs = _pool_map(_featurize_one, structures, workers, progress, desc)
        struct = np.full((len(pairs), STRUCT_FP_SIZE), np.nan)
        for i, (fp, _) in enumerate(pairs):
            if fp is not None:
                struct[i] = fp
        comp = np.array([c for _, c in pairs], dtype=float).reshape(len(pairs), COMP_FP_SIZE)
        density = np.array([float(s.density) for s in structures])
        n_el = np.array([len(s.composition.elements) for s in structures], dtype=int)
        return cls(struct, comp, density, n_el)

    @classmethod
    def concatenate(cls, parts: Iterable[Fingerprints]) -> Fingerprints:
        """The rows of several ``Fingerprints`` in order (an empty list gives zero rows)."""
        parts = list(parts)
        if not parts:
            return cls(np.empty((0, STRUCT_FP_SIZE)), np.empty((0, COMP_FP_SIZE)), np.empty(0),
                       np.empty(0, dtype=int))
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) for name in cls._ARRAYS))

    def take(self, rows: ArrayLike) -> Fingerprints:
        """The given rows (indices or a boolean mask), as new ``Fingerprints``."""
        return type(self)(*(getattr(self, name)[rows] for name in self._ARRAYS))

    def __len__(self):
        return len(self.density)

    @property
    def ok(self) -> np.ndarray:
        """Rows with a structure fingerprint and finite composition features."""
        return np.isfinite(self.structure).all(axis=1) & np.isfinite(self.composition).all(axis=1)

    def save(self, path: str | os.PathLike | IO[bytes], **extra: ArrayLike) -> None:
        """Write a compressed ``.npz`` (``path`` may be an open binary file); ``extra`` arrays are stored beside."""
        np.savez_compressed(path, **{name: getattr(self, name) for name in self._ARRAYS}, **extra)

    @classmethod
    def load(cls, path: str | os.PathLike | IO[bytes]) -> Fingerprints:
        """Read :meth:`save`'s file; a file with missing arrays or wrong shapes raises ``ValueError``."""
        with np.load(path) as data:
            try:
                fps = cls(*(data[name] for name in cls._ARRAYS))
            except KeyError as err:
                raise ValueError(f"{path}: no array {err} in a fingerprint file") from None
        n = len(fps)
        if fps.structure.shape != (n, STRUCT_FP_SIZE) or fps.composition.shape != (n, COMP_FP_SIZE) \
                or fps.n_elements.shape != (n,):
            raise ValueError(f"{path}: fingerprint arrays of inconsistent shapes")
        return fps


class CompositionScaler:
    """Standardisation of Magpie features before distances (CDVAE's ``CompScaler``).

    CDVAE fixed means and standard deviations once from MP data; here they are
    fitted on the reference set in use.  Constant features keep unit scale.
    """

    def __init__(self, mean: ArrayLike, std: ArrayLike) -> None:
        self.mean = np.asarray(mean, dtype=float)
        std = np.asarray(std, dtype=float)
        self.std = np.where(std > 1e-8, std, 1.0)

    @classmethod
    def fit(cls, features: ArrayLike) -> CompositionScaler:
        features = np.asarray(features, dtype=float)
        features = features[np.isfinite(features).all(axis=1)]
        return cls(features.mean(axis=0), features.std(axis=0))

    def transform(self, features: ArrayLike) -> np.ndarray:
        return (np.asarray(features, dtype=float) - self.mean) / self.std


def coverage(samples: Fingerprints, reference: Fingerprints, *, n_total: int | None = None,
             struct_cutoff: float = STRUCT_CUTOFF, comp_cutoff: float = COMP_CUTOFF,
             scaler: CompositionScaler | None = None) -> dict[str, Any]:
    """CDVAE coverage recall and precision.

    Parameters
    ----------
    samples, reference : Fingerprints
        Fingerprints of the samples and of the reference (test) crystals.
    n_total : int, optional
        Number of generated crystals, including those without fingerprints
        (invalid ones); the precision denominator.  Default ``len(samples)``.
    scaler : CompositionScaler, optional
        Default: fitted on the reference.

    Returns
    -------
    dict
        ``recall``: fraction of reference crystals with a sample within both
        cutoffs; ``precision``: fraction of samples within both cutoffs of a
        reference crystal; ``structure_precision`` / ``composition_precision``:
        fraction of samples within that one cutoff of some reference crystal
        (which criterion keeps a sample out of ``precision``).
    """
    from scipy.spatial.distance import cdist

    n_total = len(samples) if n_total is None else n_total
    ref_ok = reference.ok
    smp_ok = samples.ok
    if n_total == 0 or not ref_ok.any():
        return dict.fromkeys(COVERAGE_KEYS)
    if not smp_ok.any():
        return dict.fromkeys(COVERAGE_KEYS, 0.0)
    scaler = scaler or CompositionScaler.fit(reference.composition[ref_ok])
    struct_d = cdist(samples.structure[smp_ok], reference.structure[ref_ok])
    comp_d = cdist(scaler.transform(samples.composition[smp_ok]), scaler.transform(reference.composition[ref_ok]))
    struct_close, comp_close = struct_d <= struct_cutoff, comp_d <= comp_cutoff
    close = struct_close & comp_close
    return {"recall": float(close.any(axis=0).mean()), "precision": float(close.any(axis=1).sum() / n_total),
            "structure_precision": float(struct_close.any(axis=1).sum() / n_total),
            "composition_precision": float(comp_close.any(axis=1).sum() / n_total)}


def wasserstein(samples: Fingerprints, reference: Fingerprints) -> dict[str, float | None]:
    """Wasserstein distances of density (g/cm^3) and number of elements to the reference."""
    from scipy.stats import wasserstein_distance

    if len(samples) == 0 or len(reference) == 0:
        return {"density": None, "n_elements": None}
    return {
        "density": float(wasserstein_distance(samples.density, reference.density)),
        "n_elements": float(wasserstein_distance(samples.n_elements, reference.n_elements)),
    }


def diversity(fingerprints: Fingerprints, scaler: CompositionScaler | None = None) -> dict[str, float | None]:
    """Mean pairwise distance of structure and (standardised) composition fingerprints."""
    from scipy.spatial.distance import pdist

    ok = fingerprints.ok
    if ok.sum() < 2:
        return {"structure": None, "composition": None}
    comp = fingerprints.composition[ok]
    comp = (scaler or CompositionScaler.fit(comp)).transform(comp)
    return {"structure": float(pdist(fingerprints.structure[ok]).mean()), "composition": float(pdist(comp).mean())}


# -- novelty and uniqueness ------------------------------------------------------
def structure_matcher() -> StructureMatcher:
    """pymatgen's ``StructureMatcher`` with its default tolerances."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher()


def structures_match(a: Atoms | Structure, b: Atoms | Structure, matcher: StructureMatcher | None = None) -> bool:
    """``True`` when ``matcher`` (default :func:`structure_matcher`) fits ``a`` onto ``b``."""
    return _fits(matcher or structure_matcher(), as_structure(a), as_structure(b))


def _fits(matcher, a, b):
    try:
        return matcher.fit(a, b)
    except Exception:  # a degenerate structure matches nothing
        return False


def unique_flags(structures: Iterable[Atoms | Structure], matcher: StructureMatcher | None = None) -> list[bool]:
    """``True`` for the first sample of each group of matching structures.

    The fraction of ``True`` is the uniqueness rate (distinct structures over samples).
    """
    matcher = matcher or structure_matcher()
    structures = [as_structure(s) for s in structures]
    seen = defaultdict(list)  # reduced formula -> representatives
    flags = []
    for s in structures:
        reps = seen[s.composition.reduced_formula]
        new = not any(_fits(matcher, s, r) for r in reps)
        if new:
            reps.append(s)
        flags.append(new)
    return flags


class NoveltyIndex:
    """Known structures grouped by reduced formula, so novelty only compares like with like.

    Parameters
    ----------
    structures : dict or iterable
        ``{reduced_formula: [structure or zero-argument loader, ...]}`` or a
        plain iterable of structures.  Loaders (e.g. parsing a CIF) run only
        when a sample of that formula is checked.
    """

    def __init__(self, structures: Mapping[str, Iterable[Structure | Callable[[], Structure]]]
                 | Iterable[Atoms | Structure], matcher: StructureMatcher | None = None) -> None:
        if isinstance(structures, dict):
            self._groups = {k: list(v) for k, v in structures.items()}
        else:
            self._groups = defaultdict(list)
            for s in structures:
                s = as_structure(s)
                self._groups[s.composition.reduced_formula].append(s)
        self.matcher = matcher or structure_matcher()

    @classmethod
    def from_csv(cls, path: str | os.PathLike | Iterable[str | os.PathLike],
                 matcher: StructureMatcher | None = None) -> NoveltyIndex:
        """Index CDVAE-style CSVs (``cif`` column) without parsing every CIF; ``path``: one or several."""
        from pymatgen.core import Structure

        from ase_crystal_llm.data.datasets import csv_reader

        groups = defaultdict(list)
        for one in [path] if isinstance(path, (str, os.PathLike)) else path:
            with csv_reader(one) as rows, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pymatgen: "no Pauling electronegativity for He"
                for row in rows:
                    cif = row["cif"]
                    formula = reduced_formula(row.get("pretty_formula") or "") or reduced_formula(
                        Structure.from_str(cif, fmt="cif"))
                    groups[formula].append(_CifLoader(cif))
        return cls(dict(groups), matcher)

    def __len__(self):
        return sum(len(v) for v in self._groups.values())

    def add(self, structure: Atoms | Structure) -> None:
        """Know ``structure`` from now on (e.g. each new candidate of a search)."""
        structure = as_structure(structure)
        self._groups.setdefault(structure.composition.reduced_formula, []).append(structure)

    def _candidates(self, formula):
        group = self._groups.get(formula, [])
        for i, item in enumerate(group):
            if callable(item):
                group[i] = item = item()
            if item is not None:
                yield item

    def is_novel(self, structure: Atoms | Structure) -> bool:
        """``True`` when no known structure of the same reduced formula matches."""
        structure = as_structure(structure)
        return not any(_fits(self.matcher, structure, known)
                       for known in self._candidates(structure.composition.reduced_formula))


class _CifLoader:
    def __init__(self, cif):
        self.cif = cif

    def __call__(self):
        from pymatgen.core import Structure

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return Structure.from_str(self.cif, fmt="cif")
        except Exception:  # an unreadable reference row cannot match anything
            return None


def novelty_flags(structures: Iterable[Atoms | Structure], known: NoveltyIndex | Iterable[Atoms | Structure],
                  matcher: StructureMatcher | None = None) -> list[bool]:
    """``True`` for samples with no ``StructureMatcher`` match in ``known`` (a :class:`NoveltyIndex` or structures)."""
    index = known if isinstance(known, NoveltyIndex) else NoveltyIndex(known, matcher)
    return [index.is_novel(s) for s in structures]


# -- stability -------------------------------------------------------------------
def stability_rates(e_hull: Sequence[float | None], *, unique: Sequence[bool] | None = None,
                    novel: Sequence[bool] | None = None, threshold: float = METASTABLE) -> dict[str, Any]:
    """Metastable, stable and S.U.N. rates over *all* samples.

    Parameters
    ----------
    e_hull : list of float or None
        Energy above hull per sample, eV/atom; ``None`` (invalid sample, failed
        relaxation, no hull energy) counts as a failure.
    unique, novel : list of bool, optional
        Per-sample flags for the S.U.N. rate.
    """
    n = len(e_hull)
    if n == 0:
        return {"metastable": None, "stable": None, "sun": None, "n": 0}
    ok = [e is not None and math.isfinite(e) for e in e_hull]
    meta = [o and e < threshold for o, e in zip(ok, e_hull)]
    stable = [o and e <= 0.0 for o, e in zip(ok, e_hull)]
    out = {"metastable": sum(meta) / n, "stable": sum(stable) / n, "n": n}
    if unique is not None and novel is not None:
        out["sun"] = sum(s and u and v for s, u, v in zip(stable, unique, novel)) / n
        out["msun"] = sum(s and u and v for s, u, v in zip(meta, unique, novel)) / n
    return out


# -- conditional accuracy --------------------------------------------------------
def conditions_of(info: Mapping[str, Any]) -> dict[str, Any]:
    """Conditions a sample was generated with: ``info[CONDITIONS]`` (dict or JSON) or ``condition_<key>``."""
    conditions = info.get(CONDITIONS)
    if isinstance(conditions, str):
        try:
            conditions = json.loads(conditions)
        except ValueError:
            conditions = None
    conditions = dict(conditions) if isinstance(conditions, dict) else {}
    for key, value in info.items():
        if isinstance(key, str) and key.startswith("condition_"):
            conditions.setdefault(key[len("condition_"):], value)
    return conditions


def spacegroup_number(structure: Atoms | Structure, symprec: float = 0.1) -> int | None:
    """Space group number from ``SpacegroupAnalyzer``, or ``None`` when spglib fails."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    try:
        return int(SpacegroupAnalyzer(as_structure(structure), symprec=symprec).get_space_group_number())
    except Exception:  # spglib gives up on degenerate cells
        return None


def crystal_system(number: int) -> str:
    """The crystal system of space group ``number`` (``"cubic"`` for 225), as pymatgen names it."""
    return spacegroup_names(number)["system"]


def conditional_accuracy(structures: Sequence[Atoms | Structure],
                         symprecs: Sequence[float] = SYMPRECS) -> dict[str, Any]:
    """Formula and space group match rates of samples generated with those conditions.

    Returns
    -------
    dict
        ``{"formula": {"n": .., "match": ..}, "spacegroup": {"n": .., "match_symprec_0.1": ..,
        "crystal_system_match_symprec_0.1": .., ...}}``; a key is absent when no sample carries that
        condition.  The crystal-system match counts a sample whose group, if not the asked one, is of
        the same crystal system (hexagonal for 194, cubic for 225): part of the way there.
    """
    atoms = [as_atoms(s) for s in structures]
    out = {}
    asked = [(a, conditions_of(a.info).get("formula")) for a in atoms]
    asked = [(a, f) for a, f in asked if f not in (None, "")]
    if asked:
        hits = [reduced_formula(a) is not None and reduced_formula(a) == reduced_formula(str(f)) for a, f in asked]
        out["formula"] = {"n": len(asked), "match": _mean(hits)}
    asked = [(a, conditions_of(a.info).get("spacegroup")) for a in atoms]
    asked = [(a, int(g)) for a, g in asked if g not in (None, "")]
    if asked:
        entry = {"n": len(asked)}
        for symprec in symprecs:
            found = [spacegroup_number(a, symprec) for a, _ in asked]
            entry[f"match_symprec_{symprec}"] = _mean(f == g for f, (_, g) in zip(found, asked))
            entry[f"crystal_system_match_symprec_{symprec}"] = _mean(
                f is not None and crystal_system(f) == crystal_system(g) for f, (_, g) in zip(found, asked))
        out["spacegroup"] = entry
    return out
