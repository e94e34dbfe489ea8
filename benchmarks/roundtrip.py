"""Round trip of the crystal text format over all of MP-20 (train + val + test).

For every structure, ``text_to_atoms(atoms_to_text(atoms))`` must reproduce

* lattice lengths within 0.05 Angstrom,
* angles within 0.5 degree,
* fractional coordinates within 0.005 (periodic distance),
* the same species in the same order,

each compared at the bound plus 1e-9.  The script counts passes and failures
per criterion and per split and times CIF reading, canonicalization, encoding
and parsing separately.

Usage::

    nice python benchmarks/roundtrip.py                  # canonical cells (the default)
    nice python benchmarks/roundtrip.py --no-canonicalize --limit 1000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from common import report_header  # noqa: E402

from ase_crystal_llm import settings
from ase_crystal_llm.data.datasets import canonicalize, read_structures
from ase_crystal_llm.io.files import atomic_write
from ase_crystal_llm.text.format import CrystalTextError, atoms_to_text, text_to_atoms

TOL_LENGTH = 0.05  # Angstrom: one decimal
TOL_ANGLE = 0.5  # degree: rounded to integers
TOL_FRAC = 0.005  # two decimals
SLACK = 1e-9
CRITERIA = ("parses", "lengths", "angles", "frac_coords", "species")



def check(original, parsed):
    """Per-criterion pass/fail of one round trip, with the worst deviations."""
    result = {"parses": True}
    dl = np.abs(parsed.cell.lengths() - original.cell.lengths()).max()
    da = np.abs(parsed.cell.angles() - original.cell.angles()).max()
    result["lengths"] = bool(dl <= TOL_LENGTH + SLACK)
    result["angles"] = bool(da <= TOL_ANGLE + SLACK)
    same = parsed.get_chemical_symbols() == original.get_chemical_symbols()
    result["species"] = bool(same)
    if len(parsed) == len(original):
        d = parsed.get_scaled_positions(wrap=False) - original.get_scaled_positions(wrap=False)
        d -= np.round(d)
        df = float(np.abs(d).max())
    else:
        df = float("inf")
    result["frac_coords"] = bool(df <= TOL_FRAC + SLACK)
    worst = {"length": float(dl), "angle": float(da), "frac": df}
    return result, worst


def timed(function, items):
    start = time.perf_counter()
    out = [function(item) for item in items]
    return out, time.perf_counter() - start


def parse_or_error(text):
    try:
        return text_to_atoms(text)
    except CrystalTextError as err:
        return err


def run_split(split, args):
    path = settings.mp20_path(split, args.data_dir)
    start = time.perf_counter()
    structures = read_structures(path, canonical=False, limit=args.limit)
    t_read = time.perf_counter() - start
    t_canon = 0.0
    if not args.no_canonicalize:
        structures, t_canon = timed(canonicalize, structures)
    texts, t_encode = timed(atoms_to_text, structures)
    parsed, t_parse = timed(parse_or_error, texts)

    counts = {c: {"pass": 0, "fail": 0} for c in CRITERIA}
    worst = {"length": 0.0, "angle": 0.0, "frac": 0.0}
    failures = []
    for atoms, back in zip(structures, parsed):
        if isinstance(back, CrystalTextError):
            result = {c: False for c in CRITERIA}
            failures.append({"material_id": atoms.info.get("material_id"), "error": str(back)})
        else:
            result, dev = check(atoms, back)
            worst = {k: max(worst[k], dev[k]) for k in worst}
            if not all(result.values()):
                failures.append({"material_id": atoms.info.get("material_id"), **dev})
        for criterion, ok in result.items():
            counts[criterion]["pass" if ok else "fail"] += 1
    n = len(structures)
    return {
        "structures": n,
        "all_pass": n - len(failures),
        "criteria": counts,
        "worst_deviation": worst,
        "failures": failures[:50],
        "atoms": int(sum(len(a) for a in structures)),
        "seconds": {"read_cif": t_read, "canonicalize": t_canon, "encode": t_encode, "parse": t_parse},
        "per_second": {
            "read_cif": n / t_read,
            "canonicalize": n / t_canon if t_canon else None,
            "encode": n / t_encode,
            "parse": n / t_parse,
        },
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="folder holding mp_20/ (default: settings.data_dir())")
    parser.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    parser.add_argument("--limit", type=int, help="first N rows of each split")
    parser.add_argument("--no-canonicalize", action="store_true", help="check the cells as stored in the CIFs")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "roundtrip.json"))
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    splits = {}
    for split in args.splits:
        splits[split] = run_split(split, args)
        s = splits[split]
        print(
            f"{split}: {s['all_pass']}/{s['structures']} pass; "
            + ", ".join(f"{k} {v:.0f}/s" for k, v in s["per_second"].items() if v),
            file=sys.stderr,
        )
    total = {key: sum(s[key] for s in splits.values()) for key in ("structures", "all_pass", "atoms")}
    seconds = {k: sum(s["seconds"][k] for s in splits.values())
               for k in ("read_cif", "canonicalize", "encode", "parse")}
    total["criteria"] = {
        c: {r: sum(s["criteria"][c][r] for s in splits.values()) for r in ("pass", "fail")} for c in CRITERIA
    }
    total["seconds"] = seconds
    total["per_second"] = {k: (total["structures"] / v if v else None) for k, v in seconds.items()}
    total["worst_deviation"] = {
        k: max(s["worst_deviation"][k] for s in splits.values()) for k in ("length", "angle", "frac")
    }
    report = {
        **report_header("roundtrip", argv),
        "cells": "as stored" if args.no_canonicalize else "canonical (primitive, Niggli-reduced)",
        "tolerances": {"length_A": TOL_LENGTH, "angle_deg": TOL_ANGLE, "frac": TOL_FRAC, "slack": SLACK},
        "limit_per_split": args.limit,
        "total": total,
        "splits": splits,
        "load_average_1min": {"start": load_before[0], "end": os.getloadavg()[0]},
        "note": (
            "single process, run under nice on a machine shared with other jobs (see load_average): "
            "speeds are lower bounds; per_second counts structures"
        ),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(report, indent=2) + "\n")
    print(f"{total['all_pass']}/{total['structures']} pass; written {out}", file=sys.stderr)
    return 0 if total["all_pass"] == total["structures"] else 1


if __name__ == "__main__":
    sys.exit(main())
