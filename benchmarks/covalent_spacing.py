"""How close do atoms come, relative to their covalent radii, in real crystals and in samples?

For every crystal the closest pair is measured as ``d / (r_i + r_j)`` (ASE's
covalent radii, periodic images included): the ratio that ase_ga's
``closest_distances_generator`` thresholds.  The script compares MP-20
validation crystals with crystals sampled from a model at its default settings
and counts how many fall below a few candidate floors: a floor that no real
crystal violates but many samples do shows samples that the 0.5 A
structural-validity convention calls valid and a chemist would not.

Samples are drawn twice with the same seed, at the defaults (both guards on):
with the flat 0.5 A floor only (``covalent_ratio=None``) and with the
element-aware floor ``generate`` now applies (``covalent_ratio=0.6``).  For
each: attempts, re-sampled and given-up crystals, time per returned crystal
(a ratio: both runs share the machine alike), and the mixes of
:mod:`ase_crystal_llm.evaluation.distribution` beside the same number of
real val crystals, all against the same MP-20 test subsample.  Formula rows
are counted separately: how many of the asked crystals each floor gives up,
and how densely the returned ones pack (unguarded under the flat floor,
guarded under the covalent one).

    python benchmarks/covalent_spacing.py              # 1,500 val crystals, 200 samples of the shipped model
    python benchmarks/covalent_spacing.py --model DIR -n 100 --val 500 -o /tmp/spacing.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report_header  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FLOORS = (0.5, 0.55, 0.6, 0.65, 0.7)
FORMULAS = ("NaCl", "MgO", "SrTiO3", "LiFePO4", "CsPbI3")


def closest_ratio(atoms, cutoff=5.0):
    """Smallest ``d / (r_i + r_j)`` over all pairs within ``cutoff`` A (inf when none)."""
    from ase.data import covalent_radii
    from ase.neighborlist import neighbor_list

    i, j, d = neighbor_list("ijd", atoms, cutoff)
    if not len(d):
        return float("inf")
    radii = covalent_radii[atoms.numbers]
    return float(np.min(d / (radii[i] + radii[j])))


def density(atoms):
    """g/cm^3."""
    from ase.units import _amu

    return float(atoms.get_masses().sum() * _amu * 1e27 / atoms.get_volume())


def summary(ratios):
    ratios = np.asarray(ratios)
    return {"n": int(len(ratios)),
            "quantiles": {str(q): round(float(np.quantile(ratios, q)), 4) for q in (0, 0.001, 0.01, 0.05, 0.5)},
            "below": {str(f): int((ratios < f).sum()) for f in FLOORS}}


def draw(gen, n, seed, ratio, reference, **conditions):
    """Generate at the defaults with covalent floor ``ratio``; the run's counts, spacing and mixes."""
    from ase_crystal_llm.evaluation.distribution import CrystalStatistics, distribution_summary

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # give-ups are counted below
        crystals = gen.generate(n, seed=seed, covalent_ratio=ratio, **conditions)
    seconds = time.perf_counter() - start
    stats = gen.stats.as_dict()
    out = {key: stats[key] for key in ("requested", "returned", "attempts", "rejected", "gave_up")}
    if conditions:  # a formula row: how many atoms it packs, how densely
        out["mean_atoms_per_cell"] = round(float(np.mean([len(a) for a in crystals])), 2) if crystals else None
        out["mean_density"] = round(float(np.mean([density(a) for a in crystals])), 3) if crystals else None
        return out
    out["seconds_per_crystal"] = round(seconds / max(len(crystals), 1), 4)
    out["closest_pair"] = summary([closest_ratio(a) for a in crystals])
    out["distribution"] = distribution_summary(CrystalStatistics.from_structures(crystals), reference)["samples"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (default: the shipped model)")
    p.add_argument("-n", type=int, default=200, help="samples per floor (default 200)")
    p.add_argument("--val", type=int, default=1500, help="MP-20 validation crystals (default 1,500)")
    p.add_argument("--per-formula", type=int, default=10, help="crystals asked per formula (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default=str(Path(__file__).parent / "results" / "covalent_spacing.json"))
    args = p.parse_args(argv)

    from ase_crystal_llm import CrystalGenerator, settings
    from ase_crystal_llm.chemistry.validity import COVALENT_RATIO
    from ase_crystal_llm.data.datasets import read_structures
    from ase_crystal_llm.evaluation.distribution import CrystalStatistics, distribution_summary, split_statistics

    val = read_structures(settings.mp20_path("val"), limit=args.val)
    reference = split_statistics(settings.mp20_path("test"), args.n, seed=args.seed)
    real = CrystalStatistics.from_structures(val[: args.n])
    gen = CrystalGenerator.from_pretrained(args.model, device="cpu")
    floors = {"flat_0.5A": None, f"covalent_{COVALENT_RATIO}": COVALENT_RATIO}
    result = {
        **report_header("covalent_spacing", argv),
        "model": str(gen.model_dir),
        "sampling": "the model card's defaults (both guards on, min_distance 0.5 A), the same seed per floor",
        "seed": args.seed,
        "mp20_val": {**summary([closest_ratio(a) for a in val]),
                     "distribution": distribution_summary(real, reference)["samples"]},
        "samples": {name: draw(gen, args.n, args.seed, ratio, reference) for name, ratio in floors.items()},
        "formula_rows": {name: {f: draw(gen, args.per_formula, args.seed, ratio, reference, formula=f)
                                for f in FORMULAS} for name, ratio in floors.items()},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("samples", "formula_rows")}, indent=2))


if __name__ == "__main__":
    main()
