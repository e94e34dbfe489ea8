"""Does relaxing samples as written undercount the metastable ones?  Relax them again, rattled.

    python benchmarks/rattled_relaxation.py OUT/samples.extxyz OUT/report -o results/rattled_relaxation.json
    python benchmarks/rattled_relaxation.py OUT/samples.extxyz OUT/report --groups symmetric --workers 2

A relaxation keeps a structure's symmetry (its forces have that symmetry), so a
sample written on high-symmetry sites cannot leave them even where a lower
energy lies a small distortion away, while a P1 sample relaxes freely.  This
takes an evaluated run (``crystal-llm generate`` then ``crystal-llm evaluate``:
its ``samples.csv`` holds each sample's E_hull as written), splits the samples
that were relaxed into symmetric and P1 ones (spglib at symprec 0.1), and
relaxes each group again from the same structures moved by ``ase.Atoms.rattle``
(``--amplitude`` angstrom, Gaussian, seed = the sample's index), with M3GNet
and the settings of ``crystal-llm evaluate`` (FIRE + FrechetCellFilter, fmax
0.1, 500 steps, MP2020 correction, the MP-20 + elemental hull).  Per group: the
metastable rate (E_hull < 0.1 eV/atom) as written and rattled.  Real MP-20 test
crystals perturbed more strongly stay as metastable as unperturbed (98% and
97.7%, ``benchmarks/results/hull_sanity.json``), so a rattle does not make
structures metastable; it lets a trapped one find its minimum.

Results: ``-o`` (default ``benchmarks/results/rattled_relaxation.json``), with
hardware, date and command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from common import report_header  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SYMPREC = 0.1
METASTABLE = 0.1  # eV/atom


def groups(samples, e_written, symprec=SYMPREC):
    """Indices of the relaxed samples, split into ``symmetric`` and ``p1`` by their space group as written."""
    from ase_crystal_llm.evaluation.distribution import CrystalStatistics

    relaxed = [i for i, e in enumerate(e_written) if np.isfinite(e)]
    spacegroups = CrystalStatistics.from_structures([samples[i] for i in relaxed], symprec).spacegroups
    return {"symmetric": [i for i, g in zip(relaxed, spacegroups) if g > 1],
            "p1": [i for i, g in zip(relaxed, spacegroups) if g == 1]}


def rattled_e_hull(crystals, indices, amplitude, workers, cache):
    """E_hull of each crystal relaxed from a rattled copy (failures: NaN)."""
    from ase_crystal_llm import settings
    from ase_crystal_llm.evaluation import pipeline, relaxation
    from ase_crystal_llm.evaluation.hull import ReferenceHull

    moved = []
    for atoms, index in zip(crystals, indices):
        copy = atoms.copy()
        copy.rattle(amplitude, seed=index)
        moved.append(copy)
    relaxed = relaxation.relax_many(moved, "m3gnet", workers=workers, cache=cache)
    e_hull, _ = pipeline.e_above_hull_many(relaxed, ReferenceHull.from_mp20(settings.data_dir()))
    return np.array([np.nan if e is None else e for e in e_hull])


def summary(e_hull):
    finite = e_hull[np.isfinite(e_hull)]
    return {"n": int(len(e_hull)), "failed": int(len(e_hull) - len(finite)),
            "metastable": float(np.mean(finite < METASTABLE)) if len(finite) else None,
            "e_hull_median": float(np.median(finite)) if len(finite) else None}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("samples", help="the generated crystals that crystal-llm evaluate scored (extxyz, ...)")
    p.add_argument("report", help="crystal-llm evaluate's output folder (its samples.csv)")
    p.add_argument("--groups", nargs="+", choices=["symmetric", "p1"], default=["symmetric", "p1"])
    p.add_argument("--amplitude", type=float, default=0.05, help="rattle standard deviation, angstrom")
    p.add_argument("--workers", type=int, default=1, help="relaxation processes (default 1)")
    p.add_argument("--cache", help="relaxation cache (ase.db; default: none)")
    p.add_argument("-o", "--output", default=str(RESULTS / "rattled_relaxation.json"))
    args = p.parse_args(argv)
    if not args.amplitude > 0 or args.workers < 1:
        p.error("need --amplitude > 0 and --workers >= 1")
    return args


def main(argv=None):
    import ase.io
    import pandas as pd

    args = parse_args(argv)
    try:
        samples = ase.io.read(args.samples, ":")
        table = pd.read_csv(Path(args.report) / "samples.csv")
    except (OSError, ValueError) as err:
        sys.exit(f"rattled_relaxation: error: {err}")
    if len(table) != len(samples):
        sys.exit(f"rattled_relaxation: error: {args.report}/samples.csv has {len(table)} rows, "
                 f"{args.samples} {len(samples)} crystals: not the same run")
    e_written = table["e_above_hull"].to_numpy(dtype=float)
    result = {**report_header("rattled_relaxation", argv), "samples": str(args.samples),
              "amplitude_angstrom": args.amplitude, "symprec": SYMPREC, "groups": {}}
    for name, indices in groups(samples, e_written).items():
        if name not in args.groups:
            continue
        rattled = rattled_e_hull([samples[i] for i in indices], indices, args.amplitude, args.workers, args.cache)
        result["groups"][name] = {"as_written": summary(e_written[indices]), "rattled": summary(rattled)}
        print(name, json.dumps(result["groups"][name]), flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
