"""Sanity bar of the stability pipeline on real MP-20 test crystals (issue "Evaluation").

For each potential (M3GNet-MP-2021.2.8 with the aggregation check, CHGNet) and
each start (the DFT structure, and a perturbed one: +-5% random strain and
0.1 A random shifts), relax with ``relax_many`` (FIRE + FrechetCellFilter,
fmax 0.1) and report against the DFT values of the MP-20 rows:

* formation energy MAE (eV/atom) on the MP2020 scale;
* the fraction of these known (meta)stable materials called metastable
  (E_hull < 0.1 eV/atom) and stable (E_hull <= 0) when each is left out of the
  MP-20 hull (``exclude=material_id``);
* the same two numbers with the energy scale handled wrongly (M3GNet left
  uncorrected, CHGNet corrected twice), to show what the scale records prevent.

    python benchmarks/hull_sanity.py                      # 300 structures, both potentials
    python benchmarks/hull_sanity.py -n 40 -o /tmp/hull_sanity_small.json
    nice -n 10 python benchmarks/hull_sanity.py -n 300 --cache /tmp/hull_sanity_cache

Results (with hardware and date) go to benchmarks/results/hull_sanity.json,
rewritten after every potential/start so a partial run leaves its numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from common import report_header  # noqa: E402
from relax_throughput import mp20_sample, perturb  # noqa: E402

WRONG_SCALE = {"mp_raw": "mp2020", "mp2020": "mp_raw"}  # what a scale mix-up would do


def score(relaxed, hull):
    """Per-structure formation energies and E_hull (left out), right and wrong scale."""
    rows = []
    for atoms in relaxed:
        row = {"material_id": atoms.info["material_id"], "natoms": len(atoms),
               "dft": atoms.info["formation_energy_per_atom"]}
        if atoms.info.get("relax_failed"):
            row["error"] = atoms.info.get("relax_error")
            rows.append(row)
            continue
        row["steps"] = atoms.info["relax_steps"]
        row["converged"] = atoms.info["relax_converged"]
        try:
            # same as hull.e_above_hull(atoms, exclude=...), without correcting the energy twice
            formula, mid = atoms.get_chemical_formula(), atoms.info["material_id"]
            row["eform"] = hull.formation_energy(atoms)
            row["e_hull"] = hull.e_above_hull_from_formation(formula, row["eform"], exclude=mid)
            wrong = WRONG_SCALE[atoms.info["energy_scale"]]
            row["eform_wrong_scale"] = hull.formation_energy(atoms, energy_scale=wrong)
            row["e_hull_wrong_scale"] = hull.e_above_hull_from_formation(formula, row["eform_wrong_scale"], exclude=mid)
        except ValueError as err:
            row["error"] = str(err)
        rows.append(row)
    return rows


def summarise(rows, seconds):
    good = [r for r in rows if "error" not in r]
    err = np.array([r["eform"] - r["dft"] for r in good])
    err_wrong = np.array([r["eform_wrong_scale"] - r["dft"] for r in good])
    e_hull = np.array([r["e_hull"] for r in good])
    e_hull_wrong = np.array([r["e_hull_wrong_scale"] for r in good])
    n = len(rows)  # failures count against the rates
    return {
        "structures": n,
        "failed": n - len(good),
        "unconverged": sum(1 for r in good if not r["converged"]),
        "median_steps": float(np.median([r["steps"] for r in good])) if good else None,
        "seconds": seconds,
        "seconds_per_structure": seconds / max(n, 1),
        "formation_energy_mae": float(np.mean(np.abs(err))) if good else None,
        "formation_energy_median_abs_error": float(np.median(np.abs(err))) if good else None,
        "metastable_rate_left_out": float(np.sum(e_hull < 0.1) / n) if n else None,
        "stable_rate_left_out": float(np.sum(e_hull <= 0) / n) if n else None,
        "e_hull_median": float(np.median(e_hull)) if good else None,
        "wrong_scale": {
            "formation_energy_mae": float(np.mean(np.abs(err_wrong))) if good else None,
            "metastable_rate_left_out": float(np.sum(e_hull_wrong < 0.1) / n) if n else None,
            "e_hull_median": float(np.median(e_hull_wrong)) if good else None,
        },
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300, help="MP-20 test structures (default 300)")
    parser.add_argument("--potentials", nargs="+", default=["m3gnet", "chgnet"])
    parser.add_argument("--starts", nargs="+", default=["dft", "perturbed"], choices=["dft", "perturbed"])
    parser.add_argument("--fmax", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=None, help="folder for the relaxation caches (resume a run)")
    parser.add_argument("-o", "--output", default=str(Path(__file__).parent / "results" / "hull_sanity.json"))
    args = parser.parse_args(argv)

    import torch

    from ase_crystal_llm.evaluation.hull import ReferenceHull
    from ase_crystal_llm.evaluation.potentials import get_calculator
    from ase_crystal_llm.evaluation.relaxation import relax_many

    torch.set_num_threads(args.threads)
    clock = time.perf_counter()
    hull = ReferenceHull.from_mp20()
    hull_seconds = time.perf_counter() - clock
    structures = mp20_sample(args.n, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    starts = {"dft": structures, "perturbed": [perturb(a, rng) for a in structures]}

    result = {
        **report_header("hull_sanity", argv),
        "settings": {
            "structures": args.n,
            "source": f"MP-20 test split, random sample (seed {args.seed})",
            "perturbation": "symmetric strain with components uniform in +-5%, "
                            "every atom moved 0.1 A in a random direction",
            "optimizer": "FIRE + FrechetCellFilter (relax_many, batched)",
            "fmax": args.fmax,
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "torch_threads": args.threads,
            "hull": f"MP-20 train+val+test ({len(hull)} rows) + elements at 0; MP elemental reference entries; "
            "each material left out of the hull for its own E_hull",
            "hull_build_seconds": hull_seconds,
        },
        "results": {},
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    details = {}
    for potential in args.potentials:
        calc = get_calculator(potential)
        for start in args.starts:
            cache = None
            if args.cache:
                Path(args.cache).mkdir(parents=True, exist_ok=True)
                cache = Path(args.cache) / f"{potential}_{start}_{args.n}_{args.seed}.db"
            clock = time.perf_counter()
            relaxed = relax_many(
                starts[start], calc, fmax=args.fmax, steps=args.steps, batch_size=args.batch_size, cache=cache
            )
            seconds = time.perf_counter() - clock
            rows = score(relaxed, hull)
            summary = summarise(rows, seconds)
            summary.update(potential=calc.potential_name, energy_scale=calc.energy_scale)
            if hasattr(calc, "potential") and hasattr(calc.potential, "aggregation_patched"):
                summary["aggregation_patched"] = bool(calc.potential.aggregation_patched)
            key = f"{potential}/{start}"
            result["results"][key] = summary
            details[key] = rows
            print(key, json.dumps({k: v for k, v in summary.items() if k != "wrong_scale"}), flush=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
    detail_path = out.with_name(out.stem + "_structures.json")
    detail_path.write_text(json.dumps(details) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
