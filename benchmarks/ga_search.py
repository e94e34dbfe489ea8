"""What a genetic-algorithm search gains from the LLM operator (issue #20).

The same ``crystal-llm search`` (:func:`~ase_crystal_llm.ga.search.run_search`)
is run with one mutation operator at a time, at equal relaxation budgets:

* ``llm``: the model's element infill (``LLMElementMutation``, drawn from the
  model's distribution over the template's alike candidates);
* ``template``: the paper's uniform template swap over the same candidates;
* ``random``: ase_ga's own ``RandomElementMutation`` (one atom becomes
  another element of the starting set).

Each starts from a set of MP-20 *test* crystals of one chemistry (ternary
oxides, ternary halides, binary and ternary intermetallics; at most
``--max-atoms`` atoms per cell), with several seeds.  The measure is the
number of distinct (``StructureMatcher`` among the search's results) and novel
(no match in MP-20 train) children with M3GNet E_hull < 0.1 eV/atom, and
<= 0.0, per 100 relaxations; ``ratio_llm_over_template`` pools the
metastable counts over all runs.

Every run is its own search database under ``--work`` and is resumed where
it stopped, so the benchmark can be interrupted and run again (``--report-only``
summarises the databases as they are).  A search whose operator runs out of
new children stops before the budget, so the ratio compares rates per relaxation.

Usage::

    nice python benchmarks/ga_search.py --work /tmp/ga_bench            # 3 sets x 3 operators x 2 seeds x 300
    nice python benchmarks/ga_search.py --work /tmp/ga_small --budget 40 --seeds 0 --sets 1 --out /tmp/small.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
import warnings
from pathlib import Path

import numpy as np
from common import hardware

from ase_crystal_llm import settings
from ase_crystal_llm.data.datasets import csv_reader, read_structures
from ase_crystal_llm.evaluation.hull import ReferenceHull
from ase_crystal_llm.evaluation.metrics import NoveltyIndex, unique_flags
from ase_crystal_llm.evaluation.potentials import get_calculator
from ase_crystal_llm.ga.search import run_search, search_results
from ase_crystal_llm.io.files import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"
OPERATORS = ("llm", "template", "random")
METASTABLE, STABLE = 0.1, 0.0
HALOGENS = {"F", "Cl", "Br", "I"}


def _chemistry(elements):
    """The starting set a test crystal belongs to, by its elements (None: none of them)."""
    from pymatgen.core import Element

    if len(elements) == 3 and "O" in elements and not HALOGENS & elements:
        return "ternary oxides"
    if len(elements) == 3 and HALOGENS & elements and "O" not in elements:
        return "ternary halides"
    if len(elements) in (2, 3) and all(Element(e).is_metal for e in elements):
        return "intermetallics"
    return None


def starting_sets(size, max_atoms, seed=0):
    """``size`` MP-20 test crystals per chemistry, drawn with ``seed`` among those of at most ``max_atoms``."""
    from pymatgen.core import Composition

    path = settings.mp20_path("test")
    groups = {}
    with csv_reader(path) as rows, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, row in enumerate(rows):
            kind = _chemistry({el.symbol for el in Composition(row["pretty_formula"]).elements})
            if kind:
                groups.setdefault(kind, []).append(i)
    rng = np.random.default_rng(seed)
    sets = {}
    for kind in ("ternary oxides", "ternary halides", "intermetallics"):
        rows = list(rng.permutation(groups[kind]))
        chosen = []
        while len(chosen) < size and rows:  # read in chunks: the size filter needs the cell
            batch, rows = rows[:4 * size], rows[4 * size:]
            chosen += [a for a in read_structures(path, canonical=False, rows=sorted(batch)) if len(a) <= max_atoms]
        sets[kind] = chosen[:size]
    return sets


def found_flags(results, novelty):
    """Per result: is it a distinct, novel child, and its E_hull (None when failed)."""
    distinct = unique_flags([r["atoms"] for r in results])
    out = []
    for r, first in zip(results, distinct):
        e = r["e_above_hull"]
        good = r["operator"] != "start" and first and e is not None and e < METASTABLE
        out.append((good and novelty.is_novel(r["atoms"]), e))
    return out


def measure(results, novelty, budget):
    flags = found_flags(results, novelty)
    metastable = [ok for ok, _ in flags]
    stable = [ok and e <= STABLE for ok, e in flags]
    n = len(results)
    curve = np.cumsum(metastable).tolist()
    return {
        "relaxations": n, "children": sum(r["operator"] != "start" for r in results),
        "failed": sum(r["e_above_hull"] is None for r in results),
        "found_metastable": int(sum(metastable)), "found_stable": int(sum(stable)),
        "metastable_per_100": 100 * sum(metastable) / n if n else None,
        "stable_per_100": 100 * sum(stable) / n if n else None,
        "curve_metastable": curve,
        "propose_seconds": sum(r["propose_seconds"] for r in results),
        "relax_seconds": sum(r["relax_seconds"] for r in results),
        "complete": n >= budget,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="folder for the search databases (resumed when run again)")
    parser.add_argument("--budget", type=int, default=300, help="relaxations per run (default 300)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--sets", type=int, default=3, help="how many of the three chemistries (default 3)")
    parser.add_argument("--set-size", type=int, default=8, help="starting crystals per set (default 8)")
    parser.add_argument("--max-atoms", type=int, default=10)
    parser.add_argument("--operators", nargs="+", default=list(OPERATORS), choices=OPERATORS)
    parser.add_argument("--model", help="model for the llm operator (default: the shipped model)")
    parser.add_argument("--population", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "ga_search.json"))
    parser.add_argument("--report-only", action="store_true",
                        help="summarise the databases in --work as they are, relaxing nothing")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    info = {"hardware": hardware(), "date": datetime.date.today().isoformat()}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sets = dict(list(starting_sets(args.set_size, args.max_atoms).items())[: args.sets])
    hull = ReferenceHull.from_mp20()
    calculator = get_calculator("m3gnet")
    novelty = NoveltyIndex.from_csv(settings.mp20_path("train"))
    generator = None
    if "llm" in args.operators and not args.report_only:
        from ase_crystal_llm.generation.generator import CrystalGenerator

        generator = CrystalGenerator.from_pretrained(args.model, threads=args.threads)

    runs = []
    for kind, start in sets.items():
        for seed in args.seeds:
            for op in args.operators:
                db = work / f"{kind.replace(' ', '_')}-{op}-seed{seed}.db"
                t0 = time.perf_counter()
                if not args.report_only:
                    run_search(start, db, args.budget, resume=True, operators=op, seed=seed, hull=hull,
                               calculator=calculator, generator=generator if op == "llm" else None,
                               population=args.population, batch_size=args.batch_size, threads=args.threads,
                               progress=False, model=args.model)
                wall = time.perf_counter() - t0
                row = {"set": kind, "operator": op, "seed": seed,
                       **({} if args.report_only else {"wall_seconds_this_call": wall}),
                       **measure(search_results(db), novelty, args.budget)}
                runs.append(row)
                print(f"{kind:16s} {op:9s} seed {seed}: {row['found_metastable']:3d} metastable, "
                      f"{row['found_stable']:3d} stable (distinct, novel) in {row['relaxations']} relaxations; "
                      f"proposals {row['propose_seconds']:.0f} s, relaxations {row['relax_seconds']:.0f} s",
                      flush=True)
    report = summarize_runs(runs, args)
    report.update(info)
    report["starting_sets"] = {k: [a.info.get("material_id") for a in v] for k, v in sets.items()}
    atomic_write(args.out, json.dumps(report, indent=1) + "\n")
    plot(runs, args.budget, Path(args.out).with_suffix(".png"))
    print(json.dumps({k: report[k] for k in ("pooled", "ratio_llm_over_template", "llm_ahead_of_template")},
                     indent=1))


def summarize_runs(runs, args):
    pooled = {}
    for op in args.operators:
        mine = [r for r in runs if r["operator"] == op]
        n = sum(r["relaxations"] for r in mine)
        meta = [r["metastable_per_100"] for r in mine]
        pooled[op] = {
            "runs": len(mine), "relaxations": n,
            "found_metastable": sum(r["found_metastable"] for r in mine),
            "found_stable": sum(r["found_stable"] for r in mine),
            "metastable_per_100": 100 * sum(r["found_metastable"] for r in mine) / n if n else None,
            "metastable_per_100_spread": [float(np.min(meta)), float(np.max(meta))] if meta else None,
            "stable_per_100": 100 * sum(r["found_stable"] for r in mine) / n if n else None,
            "proposal_time_share": _share(mine),
        }
    ratio = count_ratio = ahead = None
    if {"llm", "template"} <= set(pooled) and pooled["template"]["found_metastable"]:
        # Searches that run out of new children stop before the budget: compare per relaxation.
        ratio = pooled["llm"]["metastable_per_100"] / pooled["template"]["metastable_per_100"]
        count_ratio = pooled["llm"]["found_metastable"] / pooled["template"]["found_metastable"]
        pairs = [(r, t) for r in runs if r["operator"] == "llm" for t in runs
                 if t["operator"] == "template" and (t["set"], t["seed"]) == (r["set"], r["seed"])]
        ahead = f"{sum(r['metastable_per_100'] > t['metastable_per_100'] for r, t in pairs)} of {len(pairs)}"
    return {
        "settings": {"budget": args.budget, "seeds": args.seeds, "set_size": args.set_size,
                     "max_atoms": args.max_atoms, "population": args.population, "batch_size": args.batch_size,
                     "potential": "m3gnet", "hull": "MP-20 (train+val+test) + MP elemental references",
                     "novel": "no StructureMatcher match in MP-20 train",
                     "found": "distinct children (no match among the search's earlier results), novel, "
                              "E_hull < 0.1 eV/atom (metastable) or <= 0.0 (stable)",
                     "model": args.model or "default"},
        "runs": [{k: v for k, v in r.items() if k != "curve_metastable"} for r in runs],
        "pooled": pooled,
        "ratio_llm_over_template": ratio,
        "ratio_llm_over_template_definition": "pooled metastable_per_100 of llm over that of template (distinct, "
                                              "novel, E_hull < 0.1 eV/atom, per relaxation)",
        "ratio_llm_over_template_counts": count_ratio,
        "llm_ahead_of_template": ahead,
        "stopped_early": [f"{r['set']}|{r['operator']}|{r['seed']}: {r['relaxations']}" for r in runs
                          if r["relaxations"] < args.budget],
        "curves": {f"{r['set']}|{r['operator']}|{r['seed']}": r["curve_metastable"] for r in runs},
    }


def _share(runs):
    propose = sum(r["propose_seconds"] for r in runs)
    total = propose + sum(r["relax_seconds"] for r in runs)
    return propose / total if total else None


def plot(runs, budget, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for op in sorted({r["operator"] for r in runs}):
        curves = [np.pad(c, (0, max(0, budget - len(c))), mode="edge")[:budget]
                  for r in runs if r["operator"] == op and (c := np.asarray(r["curve_metastable"])).size]
        if not curves:
            continue
        curves = np.array(curves, dtype=float)
        x = np.arange(1, budget + 1)
        mean = curves.mean(axis=0)
        ax.plot(x, mean, label=f"{op} (mean of {len(curves)} runs)")
        ax.fill_between(x, curves.min(axis=0), curves.max(axis=0), alpha=0.2)
    ax.set_xlabel("relaxations (M3GNet)")
    ax.set_ylabel("distinct novel children, E_hull < 0.1 eV/atom")
    ax.set_title("GA search: found vs budget, per operator")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
