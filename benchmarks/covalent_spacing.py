"""How close do atoms come, relative to their covalent radii, in real crystals and in samples?

For every crystal the closest pair is measured as ``d / (r_i + r_j)`` (ASE's
covalent radii, periodic images included): the ratio that ase_ga's
``closest_distances_generator`` thresholds.  The script compares MP-20
validation crystals with crystals sampled from a model at its default settings
(both guards on) and counts how many fall below a few candidate floors: a
floor that no real crystal violates but many samples do shows samples that
the 0.5 A structural-validity convention calls valid and a chemist would not.

    python benchmarks/covalent_spacing.py              # 1,500 val crystals, 200 samples of the shipped model
    python benchmarks/covalent_spacing.py --model DIR -n 100 --val 500 -o /tmp/spacing.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FLOORS = (0.5, 0.55, 0.6, 0.65, 0.7)


def closest_ratio(atoms, cutoff=5.0):
    """Smallest ``d / (r_i + r_j)`` over all pairs within ``cutoff`` A (inf when none)."""
    from ase.data import covalent_radii
    from ase.neighborlist import neighbor_list

    i, j, d = neighbor_list("ijd", atoms, cutoff)
    if not len(d):
        return float("inf")
    radii = covalent_radii[atoms.numbers]
    return float(np.min(d / (radii[i] + radii[j])))


def summary(ratios):
    ratios = np.asarray(ratios)
    return {"n": int(len(ratios)),
            "quantiles": {str(q): round(float(np.quantile(ratios, q)), 4) for q in (0, 0.001, 0.01, 0.05, 0.5)},
            "below": {str(f): int((ratios < f).sum()) for f in FLOORS}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (default: the shipped model)")
    p.add_argument("-n", type=int, default=200, help="samples (default 200)")
    p.add_argument("--val", type=int, default=1500, help="MP-20 validation crystals (default 1,500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default=str(Path(__file__).parent / "results" / "covalent_spacing.json"))
    args = p.parse_args(argv)

    from ase_crystal_llm import CrystalGenerator, settings
    from ase_crystal_llm.data.datasets import read_structures

    val = read_structures(settings.mp20_path("val"), limit=args.val)
    gen = CrystalGenerator.from_pretrained(args.model, device="cpu")
    samples = gen.generate(args.n, seed=args.seed)
    result = {
        "benchmark": "covalent_spacing",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(),
        "model": str(gen.model_dir),
        "sampling": "the model card's defaults (both guards on, min_distance 0.5 A)",
        "seed": args.seed,
        "mp20_val": summary([closest_ratio(a) for a in val]),
        "samples": summary([closest_ratio(a) for a in samples]),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("mp20_val", "samples")}, indent=2))


if __name__ == "__main__":
    main()
