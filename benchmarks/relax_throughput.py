"""Relaxation throughput: per-structure matgl ``Relaxer`` against the batched ``relax_many``.

Both paths relax the same MP-20 test crystals from the same perturbed starts
(+-5% random strain, 0.1 A random shifts) with M3GNet-MP-2021.2.8 (the
aggregation-checked instance), FIRE on FrechetCellFilter, fmax 0.1, in the
same process and with the same thread settings.  Reports structures per
minute, the speed-up, and how well the final energies agree.

    python benchmarks/relax_throughput.py            # 64 structures, writes benchmarks/results/relax_throughput.json
    python benchmarks/relax_throughput.py -n 16 --batch-size 16 -o /tmp/quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from common import mp20_sample, report_header  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")



def perturb(atoms, rng, strain=0.05, shift=0.1):
    """Random symmetric strain (each component within +-strain) and shifts of ``shift`` A."""
    eps = rng.uniform(-strain, strain, (3, 3))
    eps = (eps + eps.T) / 2
    out = atoms.copy()
    out.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    directions = rng.normal(size=(len(atoms), 3))
    out.positions += shift * directions / np.linalg.norm(directions, axis=1, keepdims=True)
    return out


def relax_per_structure(structures, potential, fmax, steps):
    """matgl's Relaxer, one structure at a time (what a user of matgl would write)."""
    from matgl.ext.ase import Relaxer

    from ase_crystal_llm.evaluation.batched import _small_matrix_threads

    relaxer = Relaxer(potential, optimizer="FIRE", relax_cell=True)
    energies, steps_taken = [], []
    with _small_matrix_threads():  # same BLAS setting as the batched path: a fair comparison
        for atoms in structures:
            result = relaxer.relax(atoms.copy(), fmax=fmax, steps=steps)
            trajectory = result["trajectory"]
            energies.append(float(trajectory.energies[-1]))
            steps_taken.append(len(trajectory.energies) - 1)
    return energies, steps_taken


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=64, help="structures (default 64)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--fmax", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both paths (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="torch device (default cpu)")
    parser.add_argument("--no-serial", dest="serial", action="store_false",
                        help="skip relax_many(backend='serial'), the third timing")
    parser.add_argument("-o", "--output", default=str(Path(__file__).parent / "results" / "relax_throughput.json"))
    return parser.parse_args(argv)


def main(argv=None):
    args = _parse_args(argv)

    import torch

    from ase_crystal_llm.evaluation.potentials import get_calculator
    from ase_crystal_llm.evaluation.relaxation import relax_many

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    starts = [perturb(a, rng) for a in mp20_sample(args.n, seed=args.seed)]
    calc = get_calculator("m3gnet", device=args.device)
    natoms = np.array([len(a) for a in starts])

    relax_many(starts[:2], calc, fmax=args.fmax, steps=5, batch_size=2)  # warm-up (lazy imports, first graphs)

    clock, cpu = time.perf_counter(), time.process_time()
    batched = relax_many(starts, calc, fmax=args.fmax, steps=args.steps, batch_size=args.batch_size, backend="batched")
    t_batched, c_batched = time.perf_counter() - clock, time.process_time() - cpu

    clock, cpu = time.perf_counter(), time.process_time()
    e_single, steps_single = relax_per_structure(starts, calc.potential, args.fmax, args.steps)
    t_single, c_single = time.perf_counter() - clock, time.process_time() - cpu

    serial = None
    if args.serial:  # our engine one structure at a time: separates batching from the other savings
        clock, cpu = time.perf_counter(), time.process_time()
        serial = relax_many(starts, calc, fmax=args.fmax, steps=args.steps, backend="serial")
        t_serial, c_serial = time.perf_counter() - clock, time.process_time() - cpu

    failed = [i for i, a in enumerate(batched) if a.info.get("relax_failed")]
    ok = [i for i in range(len(starts)) if i not in failed]
    e_batched = np.array([batched[i].info["energy"] for i in ok])
    diff = np.abs(e_batched - np.array(e_single)[ok]) / natoms[ok]
    result = {
        **report_header("relax_throughput", argv),
        "settings": {
            "structures": args.n,
            "source": f"MP-20 test split, random sample (seed {args.seed}), perturbed: +-5% strain, 0.1 A shifts",
            "potential": calc.potential_name,
            "aggregation_patched": bool(calc.potential.aggregation_patched),
            "optimizer": "FIRE + FrechetCellFilter",
            "fmax": args.fmax,
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "torch_threads": args.threads,
            "device": args.device or "cpu",
            "atoms_per_structure_mean": float(natoms.mean()),
        },
        "per_structure_relaxer": {
            "seconds": t_single,
            "cpu_seconds": c_single,
            "structures_per_minute": 60 * len(starts) / t_single,
            "median_steps": float(np.median(steps_single)),
        },
        "batched_relax_many": {
            "seconds": t_batched,
            "cpu_seconds": c_batched,
            "structures_per_minute": 60 * len(starts) / t_batched,
            "median_steps": float(np.median([a.info.get("relax_steps", 0) for a in batched])),
            "failed": len(failed),
            "unconverged": sum(1 for a in batched if not a.info.get("relax_failed") and not a.info["relax_converged"]),
        },
        "speedup": t_single / t_batched,
        "speedup_cpu_time": c_single / c_batched,  # robust to other load on a shared machine
        "serial_relax_many": None if serial is None else {
            "seconds": t_serial,
            "cpu_seconds": c_serial,
            "structures_per_minute": 60 * len(starts) / t_serial,
            "speedup_of_batched_over_it": t_serial / t_batched,
        },
        "energy_agreement_eV_per_atom": {
            "max_abs": float(diff.max()) if len(diff) else None,
            "median_abs": float(np.median(diff)) if len(diff) else None,
            "fraction_within_5meV": float(np.mean(diff < 0.005)) if len(diff) else None,
        },
    }
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
