"""How far samples are from the data's distribution, beside how far real data is.

A distance means little alone: a few hundred real crystals are not at distance
zero from another few hundred either.  So every distance here is reported
twice, for the samples and for the same number of *real* crystals (MP-20 val),
both against the same reference (a seeded subsample of MP-20 test), computed
the same way (pymatgen's ``SpacegroupAnalyzer`` at ``symprec`` for both, the
canonical cell of training for both).

Distances: the Jensen-Shannon distance (base 2, in [0, 1], as LeMat-GenBench
reports) between the mixes of element counts (unary, binary, ... 6+), atoms
per cell (1-40, 41+), space groups (1-230, unknown) and element frequencies
(how often each element occurs, normalised); Wasserstein distances of density
(g/cm^3) and atoms per cell.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ase_crystal_llm.chemistry.validity import as_structure
from ase_crystal_llm.data.datasets import csv_column, read_structures
from ase_crystal_llm.evaluation.references import subsample_rows
from ase_crystal_llm.text.format import ELEMENTS

__all__ = [
    "MAX_ATOMS_BIN", "MAX_ELEMENTS_BIN", "CrystalStatistics", "distances", "distribution_summary", "split_statistics",
]

MAX_ELEMENTS_BIN = 6  # 6 and more elements share a bin
MAX_ATOMS_BIN = 41  # 41 and more atoms per cell share a bin


def _spacegroup(structure, symprec: float) -> int:
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    try:
        return int(SpacegroupAnalyzer(structure, symprec=symprec).get_space_group_number())
    except Exception:  # spglib gives up on degenerate cells: its own bin (0)
        return 0


@dataclass
class CrystalStatistics:
    """Per-crystal numbers of one set of crystals."""

    n_elements: np.ndarray
    n_atoms: np.ndarray
    spacegroups: np.ndarray  # 0: spglib found none
    density: np.ndarray  # g/cm^3
    elements: list[frozenset[str]]

    @classmethod
    def from_structures(cls, structures: Sequence, symprec: float = 0.1) -> CrystalStatistics:
        """Statistics of ``ase.Atoms`` or pymatgen structures, in the cell they are given in."""
        rows = [as_structure(s) for s in structures]
        return cls(
            n_elements=np.array([len(s.composition.elements) for s in rows], dtype=int),
            n_atoms=np.array([len(s) for s in rows], dtype=int),
            spacegroups=np.array([_spacegroup(s, symprec) for s in rows], dtype=int),
            density=np.array([float(s.density) for s in rows], dtype=float),
            elements=[frozenset(el.symbol for el in s.composition.elements) for s in rows],
        )

    def __len__(self) -> int:
        return len(self.n_atoms)

    def element_count_mix(self) -> np.ndarray:
        """Fractions with 1, 2, ... 5 and 6+ elements."""
        return _histogram(np.minimum(self.n_elements, MAX_ELEMENTS_BIN) - 1, MAX_ELEMENTS_BIN)

    def atoms_per_cell_mix(self) -> np.ndarray:
        return _histogram(np.minimum(self.n_atoms, MAX_ATOMS_BIN) - 1, MAX_ATOMS_BIN)

    def spacegroup_mix(self) -> np.ndarray:
        return _histogram(self.spacegroups, 231)

    def element_frequencies(self) -> np.ndarray:
        """Fraction of crystals that contain each element of :data:`ELEMENTS`."""
        index = {el: i for i, el in enumerate(ELEMENTS)}
        counts = np.zeros(len(ELEMENTS))
        for elements in self.elements:
            for el in elements:
                counts[index[el]] += 1
        return counts / max(len(self), 1)


def _histogram(bins: np.ndarray, size: int) -> np.ndarray:
    counts = np.bincount(bins, minlength=size).astype(float)
    return counts / max(counts.sum(), 1.0)


def _jsd(p: np.ndarray, q: np.ndarray) -> float | None:
    from scipy.spatial.distance import jensenshannon

    if p.sum() == 0 or q.sum() == 0:
        return None
    return float(jensenshannon(p, q, base=2))


def distances(samples: CrystalStatistics, reference: CrystalStatistics) -> dict:
    """Jensen-Shannon and Wasserstein distances of ``samples`` to ``reference``."""
    from scipy.stats import wasserstein_distance

    if len(samples) == 0 or len(reference) == 0:
        return {}
    return {
        "element_count_jsd": _jsd(samples.element_count_mix(), reference.element_count_mix()),
        "atoms_per_cell_jsd": _jsd(samples.atoms_per_cell_mix(), reference.atoms_per_cell_mix()),
        "spacegroup_jsd": _jsd(samples.spacegroup_mix(), reference.spacegroup_mix()),
        "element_jsd": _jsd(samples.element_frequencies(), reference.element_frequencies()),
        "density_wasserstein": float(wasserstein_distance(samples.density, reference.density)),
        "atoms_per_cell_wasserstein": float(wasserstein_distance(samples.n_atoms, reference.n_atoms)),
    }


def _describe(stats: CrystalStatistics, top: int = 5) -> dict:
    """The mixes a reader compares by eye: element counts, cell size, oxygen, the commonest elements."""
    if len(stats) == 0:
        return {"n": 0}
    mix = stats.element_count_mix()
    freq = stats.element_frequencies()
    order = np.argsort(-freq)[:top]
    return {
        "n": len(stats),
        "element_count_mix": {("6+" if k == MAX_ELEMENTS_BIN else str(k)): round(float(mix[k - 1]), 4)
                              for k in range(1, MAX_ELEMENTS_BIN + 1)},
        "mean_atoms_per_cell": round(float(stats.n_atoms.mean()), 2),
        "mean_density": round(float(stats.density.mean()), 3),
        "oxygen_fraction": round(float(freq[ELEMENTS.index("O")]), 4),
        "commonest_elements": {ELEMENTS[i]: round(float(freq[i]), 4) for i in order},
        "distinct_spacegroups": int(len(set(stats.spacegroups.tolist()) - {0})),
    }


def distribution_summary(samples: CrystalStatistics, reference: CrystalStatistics,
                         real: CrystalStatistics | None = None) -> dict:
    """Distances of the samples, and of real crystals, to the reference; with the mixes of each set."""
    out = {"samples": {**_describe(samples), **distances(samples, reference)},
           "reference": _describe(reference)}
    if real is not None:
        out["real"] = {**_describe(real), **distances(real, reference)}
    return out


def split_statistics(path: str | os.PathLike, size: int | None, seed: int = 0,
                     symprec: float = 0.1, n_rows: int | None = None) -> CrystalStatistics:
    """Statistics of a seeded subsample of ``size`` rows of an MP-20 split (all rows: ``None``), canonical cells.

    The rows are those :func:`~.references.subsample_rows` picks, the same as the coverage reference's
    for the same size and seed; only they are parsed.  ``n_rows``: the split's row count when the
    caller knows it (saves reading the file once more).
    """
    n_rows = len(csv_column(path, "material_id")) if n_rows is None else n_rows
    rows = subsample_rows(n_rows, size, seed)
    return CrystalStatistics.from_structures(read_structures(path, rows=rows), symprec)
