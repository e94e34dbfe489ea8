"""A genetic-algorithm search for stable ABO3 perovskites with the LLM operator.

The search is :func:`~ase_crystal_llm.ga.search.run_search` (what
``crystal-llm search`` runs): random cubic ABO3 cells to start, children from
the language model's element swap (weight 3) and ase_ga's ``StrainMutation``
(weight 1), kept inside the A-B-O chemical space, every candidate relaxed with
M3GNet and scored by ``raw_score = -E_hull`` (energy above the MP-20 hull).

Run (CPU, a few minutes)::

    python docs/examples/ga_search.py --model path/to/model --out perovskites.db --budget 40
    python docs/examples/ga_search.py --out perovskites.db --budget 80 --resume   # the same search, further

The database is an ordinary ase_ga database: ``ase db perovskites.db
relaxed=1 -s raw_score-`` lists the candidates, best first.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from ase import Atoms

from ase_crystal_llm.ga.search import run_search

A_SITE = ["Ca", "Sr", "Ba", "Pb"]
B_SITE = ["Ti", "Zr", "Hf", "Sn"]


def perovskite(a_el, b_el, a=4.0):
    """The 5-atom cubic ABO3 cell."""
    return Atoms(
        [a_el, b_el, "O", "O", "O"],
        scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
        cell=[a, a, a],
        pbc=True,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="crystal-llm model directory (default: the shipped model)")
    parser.add_argument("--out", default="perovskites.db", help="the search database (default %(default)s)")
    parser.add_argument("--budget", type=int, default=40, help="relaxations in the whole search (default 40)")
    parser.add_argument("--resume", action="store_true", help="continue the search in --out to --budget")
    parser.add_argument("--start", type=int, default=6, help="random starting cells (default 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (5-atom cells: more threads mostly wait on each other)")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    start = [perovskite(rng.choice(A_SITE), rng.choice(B_SITE)) for _ in range(args.start)]
    try:
        summary = run_search(start, args.out, args.budget, resume=args.resume, model=args.model,
                             operators="llm:3,strain:1", elements=",".join(A_SITE + B_SITE + ["O"]),
                             population=8, batch_size=4, seed=args.seed, threads=args.threads)
    except FileExistsError:
        parser.error(f"{args.out} already holds a search: pass --resume to continue it, or choose another --out")
    print(f"\n{summary['relaxations']} relaxations, {summary['children']} children, "
          f"{summary['found']['below_0.1']['distinct']} distinct below 0.1 eV/atom")
    print(f"\n{'formula':<10} {'E_hull (eV/atom)':>16}  operator")
    for row in summary["best"]:
        print(f"{row['formula']:<10} {row['e_above_hull']:>16.3f}  {row['operator']}")
    if summary["stopped"]:
        print(f"stopped early: {summary['stopped']}", file=sys.stderr)
    print(f"\nall candidates: ase db {args.out} relaxed=1 -s raw_score-")


if __name__ == "__main__":
    main()
