"""Do two potentials agree on which samples are metastable?  Compare two `crystal-llm evaluate` reports.

Both reports must come from the same sample file (the same rows, in order),
relaxed with different potentials, e.g.

    crystal-llm evaluate samples.extxyz -o rep_m3gnet --limit 200
    crystal-llm evaluate samples.extxyz -o rep_sevennet --limit 200 --potential sevennet
    python benchmarks/potential_agreement.py rep_m3gnet rep_sevennet

It joins their ``samples.csv`` tables and reports, at E_hull < 0.1 (metastable)
and <= 0 (stable): the rate under each potential, the 2 x 2 table of verdicts
(both, only A, only B, neither), the agreement, and how often a sample one
potential calls metastable the other does too (both directions); plus the
median and mean absolute E_hull difference over samples both judged.
Results: ``benchmarks/results/potential_agreement.json`` (or ``-o``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report_header  # noqa: E402


def read_table(report):
    with open(Path(report) / "samples.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def e_hull(row):
    return float(row["e_above_hull"]) if row["e_above_hull"] else None


def verdicts(a_rows, b_rows, threshold, strict):
    """2 x 2 counts over all samples (a failed relaxation or an invalid sample counts as 'not')."""
    def passes(e):
        return e is not None and (e < threshold if strict else e <= threshold)

    a = [passes(e_hull(r)) for r in a_rows]
    b = [passes(e_hull(r)) for r in b_rows]
    table = {"both": sum(x and y for x, y in zip(a, b)), "only_a": sum(x and not y for x, y in zip(a, b)),
             "only_b": sum(y and not x for x, y in zip(a, b)), "neither": sum(not x and not y for x, y in zip(a, b))}
    n = len(a)
    return {"rate_a": sum(a) / n, "rate_b": sum(b) / n, **table, "agreement": (table["both"] + table["neither"]) / n,
            "b_given_a": table["both"] / max(sum(a), 1), "a_given_b": table["both"] / max(sum(b), 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report_a")
    p.add_argument("report_b")
    p.add_argument("-o", "--output", default=str(Path(__file__).parent / "results" / "potential_agreement.json"))
    args = p.parse_args(argv)
    a_rows, b_rows = read_table(args.report_a), read_table(args.report_b)
    if [r["formula"] for r in a_rows] != [r["formula"] for r in b_rows]:
        sys.exit("potential_agreement: the two reports are not of the same samples (formulas differ row by row)")
    both = [(e_hull(x), e_hull(y)) for x, y in zip(a_rows, b_rows) if e_hull(x) is not None and e_hull(y) is not None]
    diff = np.abs(np.subtract(*zip(*both))) if both else np.array([])
    name = lambda rows: next((r["potential"] for r in rows if r["potential"]), "?")  # noqa: E731
    result = {
        **report_header("potential_agreement", argv),
        "reports": {"a": str(args.report_a), "b": str(args.report_b)},
        "potentials": {"a": name(a_rows), "b": name(b_rows)},
        "hull": next((r["hull"] for r in a_rows if r["hull"]), None),
        "samples": len(a_rows),
        "judged_by_both": len(both),
        "metastable": verdicts(a_rows, b_rows, 0.1, strict=True),
        "stable": verdicts(a_rows, b_rows, 0.0, strict=False),
        "e_hull_abs_difference": {"median": float(np.median(diff)) if len(diff) else None,
                                  "mean": float(np.mean(diff)) if len(diff) else None},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("potentials", "samples", "metastable", "stable", "e_hull_abs_difference")},
                     indent=2))


if __name__ == "__main__":
    main()
