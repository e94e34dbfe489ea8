"""How much of a crystal's symmetry survives its text, with and without the translation augmentation.

Each MP-20 crystal (canonical cell, as in training) is written as text, read
back and given to pymatgen's ``SpacegroupAnalyzer``; the score is the share
that keep their labelled space group.  Three ways of writing it:

* ``none``: the coordinates as they are (rounded to two decimals);
* ``continuous``: shifted by a uniform random vector first, then rounded, the
  paper's augmentation (this package's training before 2026-12-04);
* ``grid``: shifted by a random whole number of hundredths per axis, the
  package's augmentation now (``atoms_to_text(..., translate=True)``).

The first and last must agree (the grid shift moves the rounded text as a
block); the gap to ``continuous`` is symmetry that training text lost.  The
same score is the ceiling of a space-group-conditioned generator measured at
the same ``symprec``: real crystals written as training text reach no more.
Also reported without rounding (``exact``), to show the labels themselves.

Usage::

    python benchmarks/text_symmetry.py                  # 1,000 val crystals
    python benchmarks/text_symmetry.py --split train -n 2000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from common import report_header  # noqa: E402

from ase_crystal_llm import settings
from ase_crystal_llm.data.datasets import read_structures
from ase_crystal_llm.evaluation.metrics import spacegroup_number
from ase_crystal_llm.io.files import atomic_write
from ase_crystal_llm.text.format import FRACTIONAL_DECIMALS, atoms_to_text, text_to_atoms

SYMPRECS = (0.1, 0.01)


def continuous_text(atoms, rng):
    """The pre-2026-12-04 augmentation: a uniform shift, then rounding of each atom."""
    moved = atoms.copy()
    moved.set_scaled_positions(atoms.get_scaled_positions(wrap=False) + rng.random(3))
    return atoms_to_text(moved)


def writers(seed):
    rng = np.random.default_rng(seed)
    return {
        "exact": lambda atoms: atoms,
        "none": lambda atoms: text_to_atoms(atoms_to_text(atoms)),
        "continuous": lambda atoms: text_to_atoms(continuous_text(atoms, rng)),
        "grid": lambda atoms: text_to_atoms(atoms_to_text(atoms, translate=True, rng=rng)),
    }


def score(crystals, seed):
    labels = [int(a.info["spacegroup_number"]) for a in crystals]
    out = {}
    for name, write in writers(seed).items():
        read_back = [write(a) for a in crystals]
        out[name] = {f"symprec_{s}": float(np.mean([spacegroup_number(b, s) == g for b, g in zip(read_back, labels)]))
                     for s in SYMPRECS}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", default="val", choices=["train", "val", "test"])
    parser.add_argument("-n", type=int, default=1000, help="first N crystals of the split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "text_symmetry.json"))
    args = parser.parse_args(argv)
    crystals = read_structures(settings.mp20_path(args.split), limit=args.n)
    report = {
        **report_header("text_symmetry", argv),
        "split": args.split,
        "n": len(crystals),
        "fractional_decimals": FRACTIONAL_DECIMALS,
        "keeps_labelled_spacegroup": score(crystals, args.seed),
    }
    atomic_write(args.out, json.dumps(report, indent=2) + "\n")
    for name, row in report["keeps_labelled_spacegroup"].items():
        print(f"{name:>10}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
