"""Calibration rows for the stability numbers of ``crystal-llm evaluate`` (issue "Evaluation").

The metastable rate of generated samples means little on its own; these rows
put it on a scale, measured with exactly the pipeline ``evaluate`` uses
(``relax_many`` with the aggregation-checked M3GNet-MP-2021.2.8, FIRE on
FrechetCellFilter, fmax 0.1, at most 500 steps; MP2020 correction;
``ReferenceHull.from_mp20``; metastable E_hull < 0.1 eV/atom, stable <= 0,
both over *all* structures of the row, failures included):

* ``mp20_test``: random MP-20 test crystals relaxed from their DFT cells, each
  left out of the hull (``exclude=material_id``) while it is judged: what
  known (meta)stable materials score, close to the ceiling;
* ``paper_samples``: random rows of the paper's published metastable samples
  (judged metastable against the full Materials Project hull by the paper's
  TensorFlow M3GNet), relaxed by our M3GNet and judged against our hull;
* ``template_swap``: random MP-20 training crystals, each mutated once by the
  paper's template baseline (``infill.TemplateElementMutation``: one element
  swapped for an ionic look-alike), relaxed and judged: a naive generator's
  score.  Uniqueness, novelty against the training split and S.U.N. are
  reported too.

Each row also gives the structural and compositional validity of its
structures as given (for ``mp20_test``: the data's own, the ceiling of a
generator that matches it).

    python benchmarks/calibration.py                   # 1000 / 250 / 1000 structures
    python benchmarks/calibration.py --n-test 10 --n-paper 5 --n-swap 10 --out /tmp/cal.json

A row of size 0 is skipped.  Results (hardware, date, settings, command) go to
``benchmarks/results/calibration.json``, rewritten after every row; per-structure
E_hull values to ``calibration_structures.json`` beside it.  Relaxations are
cached (``--cache``, by default in the user cache folder), so the same command
after an interruption relaxes only what is missing.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from common import mp20_sample, report_header, sample_csv  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "calibration.json"
PAPER_FILE = "metastable_structures_llama-2-7B_0.7_0.7.csv.gz"
ROWS = ("mp20_test", "paper_samples", "template_swap")


def paper_file(name):
    """A paper sample file: a path, or a file name in ``<data>/paper_samples``."""
    from ase_crystal_llm import settings


    path = Path(name)
    if path.is_file():
        return path
    path = settings.data_dir() / "paper_samples" / name
    if not path.is_file():
        raise FileNotFoundError(f"paper sample file not found: {name} (nor {path})")
    return path


def mp20_elements(split="train"):
    """The elements that occur in an MP-20 split (its ``elements`` column)."""
    import ast

    from ase_crystal_llm import settings
    from ase_crystal_llm.data.datasets import csv_column

    column = csv_column(settings.mp20_path(split), "elements")
    return sorted({el for cell in column for el in ast.literal_eval(cell)})


def template_swaps(n, seed, pool="mp20"):
    """``n`` random MP-20 training crystals, each with one template element swap.

    Parents come from the training split (seed ``seed``); the children go
    through ``infill.mutate_structures`` (one child per parent, parents taken in
    turn; a parent with no allowed swap is passed over with a warning, counted).
    ``pool="mp20"`` swaps only to elements of the training split: the swap table
    also pairs lanthanides with actinides (Am, Bk, Cf, ...) and I with At, which
    M3GNet-MP-2021 cannot relax and the MP-20 hull cannot judge; ``"any"`` keeps them
    (they count as failed relaxations).
    """
    from ase_crystal_llm.ga.operators import TemplateElementMutation, mutate_structures

    parents = mp20_sample(n, seed=seed, split="train")
    element_pool = mp20_elements("train") if pool == "mp20" else None
    operator = TemplateElementMutation(element_pool=element_pool, rng=np.random.default_rng(seed))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        children = list(mutate_structures(parents, len(parents), operator))
    skipped = sum("no allowed swap" in str(w.message) for w in caught)
    return children, skipped


def novelty_flags(structures):
    """Unique (within the row) and novel (against the MP-20 training split) flags, as ``evaluate`` takes them."""
    from ase_crystal_llm import settings
    from ase_crystal_llm.evaluation import metrics

    index = metrics.NoveltyIndex.from_csv(settings.mp20_path("train"))
    return metrics.unique_flags(structures), [index.is_novel(s) for s in structures]


def judge(structures, calc, hull, args, *, leave_out=False, unique=None, novel=None):
    """Relax, take E_hull, and summarise one row; returns (summary, per-structure records)."""
    from ase_crystal_llm.chemistry import validity
    from ase_crystal_llm.evaluation import metrics
    from ase_crystal_llm.evaluation.pipeline import _cache_rows, _count_reasons, _relaxation_summary, e_above_hull_many
    from ase_crystal_llm.evaluation.relaxation import relax_many

    clock = time.perf_counter()
    before = _cache_rows(args.cache) if args.cache else 0
    relaxed = relax_many(structures, calc, fmax=args.fmax, steps=args.steps, batch_size=args.batch_size,
                         threads=args.threads, cache=args.cache)
    computed = _cache_rows(args.cache) - before if args.cache else len(relaxed)
    relax_seconds = time.perf_counter() - clock
    exclude = [a.info["material_id"] for a in structures] if leave_out else None
    clock = time.perf_counter()
    e_hull, errors = e_above_hull_many(relaxed, hull, exclude=exclude)
    hull_seconds = time.perf_counter() - clock
    rates = metrics.stability_rates(e_hull, unique=unique, novel=novel)
    finite = [e for e in e_hull if e is not None]
    summary = {
        "n": len(structures),
        # Of the structures as given: the data's own validity is the ceiling for a generator's.
        "validity": validity.validity_rates(validity.validity_flags(structures)),
        "relaxation": _relaxation_summary(relaxed, computed),
        "relaxed_ok": sum(not a.info.get("relax_failed") for a in relaxed),
        "hull_ok": len(finite),
        "failures": _count_reasons(errors),
        "metastable_rate": rates["metastable"],
        "stable_rate": rates["stable"],
        "e_hull_median": float(np.median(finite)) if finite else None,
        "relax_seconds": round(relax_seconds, 1),
        "relax_seconds_per_computed_structure": round(relax_seconds / computed, 2) if computed else None,
        "hull_seconds": round(hull_seconds, 1),
    }
    if unique is not None:
        summary.update(uniqueness=float(np.mean(unique)), novelty=float(np.mean(novel)),
                       sun_rate=rates["sun"], msun_rate=rates["msun"])
    records = []
    for i, atoms in enumerate(relaxed):
        record = {key: atoms.info[key] for key in ("material_id", "row", "parent_material_id", "mutation")
                  if key in atoms.info}
        record.update(formula=atoms.get_chemical_formula(), e_hull=e_hull[i], error=errors[i],
                      steps=atoms.info.get("relax_steps"))
        records.append(record)
    return summary, records


def run_row(name, calc, hull, args):
    """Draw the structures of one row and judge them; returns (summary, records)."""
    clock = time.perf_counter()
    if name == "mp20_test":
        summary, records = judge(mp20_sample(args.n_test, seed=args.seed), calc, hull, args, leave_out=True)
        summary["source"] = f"MP-20 test split, random sample (seed {args.seed}), DFT cells, each left out of the hull"
    elif name == "paper_samples":
        path = paper_file(args.paper_file)
        summary, records = judge(sample_csv(path, args.n_paper, seed=args.seed), calc, hull, args)
        summary["source"] = f"{path.name}, random rows (seed {args.seed}), as published"
    else:
        children, skipped = template_swaps(args.n_swap, args.seed, args.swap_pool)
        unique, novel = novelty_flags(children)
        summary, records = judge(children, calc, hull, args, unique=unique, novel=novel)
        summary["parents_without_swap"] = skipped
        pool = "elements of the train split" if args.swap_pool == "mp20" else "any element"
        summary["source"] = (f"MP-20 train split, random sample (seed {args.seed}), one TemplateElementMutation "
                             f"each (ionic radius tolerance 0.1 A, swapped to {pool}); novelty against the train split")
    summary["seconds"] = round(time.perf_counter() - clock, 1)
    summary["seconds_per_structure"] = round(summary["seconds"] / max(summary["n"], 1), 2)
    return summary, records


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-test", type=int, default=1000, help="MP-20 test crystals (default 1000; 0 skips)")
    parser.add_argument("--n-paper", type=int, default=250, help="paper samples (default 250; 0 skips)")
    parser.add_argument("--n-swap", type=int, default=1000, help="template-swapped training crystals (default 1000)")
    parser.add_argument("--paper-file", default=PAPER_FILE,
                        help=f"a paper sample file: path, or name in <data>/paper_samples (default {PAPER_FILE})")
    parser.add_argument("--swap-pool", choices=("mp20", "any"), default="mp20",
                        help="template swaps only to elements of the MP-20 train split (default), or to any")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fmax", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32, help="structures relaxed together (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--cache", default=None,
                        help="relaxation cache (ase.db; default <user cache>/calibration_relax.db)")
    parser.add_argument("--no-cache", action="store_true", help="relax everything afresh, cache nothing")
    parser.add_argument("--out", default=str(RESULTS), help=f"results JSON (default {RESULTS})")
    args = parser.parse_args(argv)
    for name in ("n_test", "n_paper", "n_swap"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("batch_size", "threads", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.fmax > 0:
        parser.error("--fmax must be > 0")
    if args.n_paper:
        try:
            paper_file(args.paper_file)
        except (FileNotFoundError, ValueError) as err:  # ValueError: no data folder configured
            parser.error(str(err))
    return args


def main(argv=None):
    args = parse_args(argv)

    import torch

    from ase_crystal_llm import settings
    from ase_crystal_llm.evaluation.hull import ReferenceHull
    from ase_crystal_llm.evaluation.potentials import get_calculator

    torch.set_num_threads(args.threads)
    if args.no_cache:
        args.cache = None
    elif args.cache is None:
        args.cache = str(settings.cache_dir() / "calibration_relax.db")
    calc = get_calculator("m3gnet")
    clock = time.perf_counter()
    hull = ReferenceHull.from_mp20()
    result = {
        **report_header("calibration", argv),
        "settings": {
            "potential": calc.potential_name, "energy_scale": calc.energy_scale,
            "aggregation_patched": bool(getattr(getattr(calc, "potential", None), "aggregation_patched", False)),
            "optimizer": "FIRE + FrechetCellFilter (relax_many, batched)", "fmax": args.fmax,
            "max_steps": args.steps, "batch_size": args.batch_size, "torch_threads": args.threads,
            "seed": args.seed, "relax_cache": args.cache,
            "hull": f"ReferenceHull.from_mp20: MP-20 train+val+test ({len(hull)} rows) + MP elemental references",
            "hull_build_seconds": round(time.perf_counter() - clock, 1),
            "metastable": "E_hull < 0.1 eV/atom", "stable": "E_hull <= 0",
            "rates_over": "all structures of the row (failed relaxations and hull errors count as not metastable)",
        },
        "rows": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    details_path = out.with_name(out.stem + "_structures.json")
    details = {}
    sizes = {"mp20_test": args.n_test, "paper_samples": args.n_paper, "template_swap": args.n_swap}
    for name in ROWS:
        if not sizes[name]:
            continue
        summary, details[name] = run_row(name, calc, hull, args)
        result["rows"][name] = summary
        _write(out, result)  # a finished row survives a later kill
        _write(details_path, details)
        print(summary_line(name, summary), flush=True)
    print(f"written {out}")


def summary_line(name, s):
    """One printed line per row."""
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    median = "n/a" if s["e_hull_median"] is None else f"{s['e_hull_median']:+.3f}"
    line = (f"{name:14s} n={s['n']:<5d} relaxed ok {s['relaxed_ok']}, failed {s['relaxation']['failed']}  "
            f"metastable {pct(s['metastable_rate'])}  stable {pct(s['stable_rate'])}  "
            f"median E_hull {median} eV/atom  {s['seconds']:.0f} s")
    if "novelty" in s:
        line += f"  novel {pct(s['novelty'])}"
    return line


def _write(path, data):
    """Whole or not at all (a kill mid-write keeps the previous file)."""
    from ase_crystal_llm.io.files import atomic_write

    atomic_write(path, json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
