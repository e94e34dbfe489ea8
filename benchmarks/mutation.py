"""Element mutation as a search step: the paper's Figure 7 experiment (Gruver et al., 2024).

Each of N MP-20 test structures gets one element mutation, and each child is
relaxed with M3GNet and scored by its energy above the MP-20 hull:

* ``template``: the ionic-radius template swap (paper, Appendix C);
* ``llm@T``: the model's infill proposal at temperature T
  (``LLMElementMutation``, restricted to the template candidates unless
  ``--any-element``).

For each method the script reports the stable rate (E_hull <= 0 eV/atom), the
metastable rate (E_hull <= 0.1 eV/atom), both per parent (a parent without an
allowed swap counts as a miss) and per child, and the diversity of the stable
children: distinct compositions and distinct element swaps.  Children already
on the MP-20 hull come out near 0 eV/atom, so ``novel_stable`` also counts the
stable children whose composition is not an MP-20 formula.  As a check of
the model itself, ``infill_recovery`` masks one element of each parent and
reports how often the model ranks the true element first (or in its top 5)
among all elements.

Relaxations are batched and cached (``relax_many``), so an interrupted run
resumes, and children shared by several methods are relaxed once.

Usage::

    nice python benchmarks/mutation.py --model path/to/model -n 30
    nice python benchmarks/mutation.py --model path/to/model -n 3000 --temperatures 0.5 0.7 1.0 1.5 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from common import report_header  # noqa: E402

from ase_crystal_llm import settings
from ase_crystal_llm.data.datasets import csv_column, read_structures
from ase_crystal_llm.evaluation.hull import ReferenceHull
from ase_crystal_llm.evaluation.relaxation import relax_many, structure_hash
from ase_crystal_llm.ga.operators import LLMElementMutation, TemplateElementMutation
from ase_crystal_llm.io.files import atomic_write

STABLE = 0.0  # eV/atom
METASTABLE = 0.1  # eV/atom
RESULTS = Path(__file__).resolve().parent / "results"



def mutate_all(parents, operator):
    """One child per parent (None where the operator finds no allowed swap)."""
    children = []
    for index, parent in enumerate(parents):
        child, _ = operator.get_new_individual([parent])
        if child is not None:
            old, new = child.info["data"]["element_swap"]
            child.info = {"parent_index": index, "swap": f"{old}->{new}"}
        children.append(child)
    return children


def infill_recovery(generator, parents, rng):
    """How well the model names a masked element it has not been told.

    For each parent one element (drawn uniformly) is masked and every element
    is scored; reports the top-1 / top-5 rate of the true element and its mean
    probability (uniform guessing: 1/118).
    """
    from ase_crystal_llm.generation.infill import propose_elements
    from ase_crystal_llm.text.format import ELEMENTS

    ranks, probs = [], []
    for atoms in parents:
        element = str(rng.choice(sorted(set(atoms.get_chemical_symbols()))))
        dist = propose_elements(generator, atoms, element, candidates=ELEMENTS)
        order = sorted(dist, key=dist.get, reverse=True)
        ranks.append(order.index(element) + 1)
        probs.append(dist[element])
    ranks = np.array(ranks)
    return {
        "structures": len(ranks),
        "top1": float(np.mean(ranks == 1)),
        "top5": float(np.mean(ranks <= 5)),
        "mean_probability": float(np.mean(probs)),
        "uniform_probability": 1 / len(ELEMENTS),
    }


def summarize(children, e_hull, known_formulas):
    """Stable / metastable rates and diversity of the stable children of one method."""
    n = len(children)
    made = [i for i, c in enumerate(children) if c is not None]
    scored = [i for i in made if e_hull[i] is not None]
    stable = [i for i in scored if e_hull[i] <= STABLE]
    metastable = [i for i in scored if e_hull[i] <= METASTABLE]
    formulas = {i: reduced_formula(children[i].get_chemical_formula()) for i in made}
    return {
        "parents": n,
        "children": len(made),
        "no_swap": n - len(made),
        "relax_failed": len(made) - len(scored),
        "stable": len(stable),
        "metastable": len(metastable),
        "stable_rate": len(stable) / n if n else 0.0,
        "metastable_rate": len(metastable) / n if n else 0.0,
        "stable_rate_per_child": len(stable) / len(made) if made else 0.0,
        "metastable_rate_per_child": len(metastable) / len(made) if made else 0.0,
        "stable_unique_compositions": len({formulas[i] for i in stable}),
        "stable_unique_swaps": len({children[i].info["swap"] for i in stable}),
        "novel_stable": sum(formulas[i] not in known_formulas for i in stable),
        "median_e_above_hull": float(np.median([e_hull[i] for i in scored])) if scored else None,
    }


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="crystal-llm model directory (default: the shipped model)")
    parser.add_argument("-n", type=int, default=30, help="number of MP-20 test structures (paper: 3000)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0, 1.5])
    parser.add_argument("--any-element", action="store_true", help="let the model choose among all elements")
    parser.add_argument("--tolerance", type=float, default=0.1, help="template ionic radius tolerance, A")
    parser.add_argument("--potential", default="m3gnet")
    parser.add_argument("--fmax", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--device", help="torch device for the model and the potential")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", default=str(RESULTS / "mutation.json"))
    parser.add_argument("--details", help="also write one CSV row per child (method, parent, swap, E_hull)")
    parser.add_argument("--cache", default=str(settings.cache_dir() / "mutation_relax_cache.db"),
                        help="ase.db of finished relaxations, reused on the next run; '' for none")
    return parser.parse_args(argv)


def _distinct_children(children):
    """Structure hash -> child, each distinct child once (in first-seen order)."""
    unique = {}
    for kids in children.values():
        for child in kids:
            if child is not None:
                unique.setdefault(structure_hash(child), child)
    return unique


def _print_summary(results, recovery, out):
    print(f"{'method':<12} {'children':>8} {'stable':>8} {'metastable':>10} {'uniq.comp':>9}")
    for name, r in results.items():
        print(f"{name:<12} {r['children']:>8} {r['stable_rate']:>8.1%} {r['metastable_rate']:>10.1%} "
              f"{r['stable_unique_compositions']:>9}")
    print(f"masked element recovered: top-1 {recovery['top1']:.1%}, top-5 {recovery['top5']:.1%}")
    print(f"results: {out}", file=sys.stderr)


def main(argv=None):
    args = _parse_args(argv)

    import torch

    from ase_crystal_llm.generation.generator import CrystalGenerator

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    generator = CrystalGenerator.from_pretrained(args.model, device=args.device)
    parents = read_structures(settings.mp20_path("test"), limit=args.n)
    hull = ReferenceHull.from_mp20()
    known = _known_formulas()
    setup_s = time.perf_counter() - t0

    methods = {"template": TemplateElementMutation(tolerance=args.tolerance,
                                                   rng=np.random.default_rng([args.seed, 0]))}
    for k, temperature in enumerate(args.temperatures, start=1):
        methods[f"llm@{temperature:g}"] = LLMElementMutation(
            generator, temperature=temperature, tolerance=args.tolerance,
            restrict_to_template=not args.any_element, rng=np.random.default_rng([args.seed, k]))

    t1 = time.perf_counter()
    children = {}
    mutate_s = {}
    for name, operator in methods.items():
        start = time.perf_counter()
        children[name] = mutate_all(parents, operator)
        mutate_s[name] = time.perf_counter() - start

    # Relax every distinct child once.
    unique = _distinct_children(children)
    keys = list(unique)
    t2 = time.perf_counter()
    relaxed = relax_many([unique[k] for k in keys], args.potential, fmax=args.fmax, steps=args.steps,
                         cache=args.cache or None, device=args.device)
    relax_s = time.perf_counter() - t2
    e_by_key = {}
    for key, atoms in zip(keys, relaxed):
        e_by_key[key] = None if atoms.info.get("relax_failed") else float(hull.e_above_hull(atoms))

    t3 = time.perf_counter()
    recovery = infill_recovery(generator, parents, np.random.default_rng([args.seed, 99]))
    recovery["seconds"] = round(time.perf_counter() - t3, 1)

    results = {}
    for name, kids in children.items():
        e_hull = [None if c is None else e_by_key[structure_hash(c)] for c in kids]
        results[name] = summarize(kids, e_hull, known)
        results[name]["mutation_seconds"] = round(mutate_s[name], 2)

    record = {
        **report_header("mutation", argv),
        "model": str(generator.model_dir),
        "model_weights_sha256": generator.weights_sha256(),
        "model_kind": getattr(generator.card, "kind", None),
        "model_base": getattr(generator.card, "base_model", None),
        "model_training": {
            "structures": (getattr(generator.card, "training_data", None) or {}).get("n_structures"),
            "final_losses": getattr(generator.card, "final_losses", None),
        },
        "potential": args.potential,
        "structures": f"first {len(parents)} MP-20 test structures (canonical cells)",
        "thresholds_eV_per_atom": {"stable": STABLE, "metastable": METASTABLE},
        "restrict_to_template": not args.any_element,
        "tolerance": args.tolerance,
        "seed": args.seed,
        "torch_threads": torch.get_num_threads(),
        "distinct_children_relaxed": len(keys),
        "seconds": {"setup": round(setup_s, 1), "mutation": round(t2 - t1, 1), "relaxation": round(relax_s, 1),
                    "total": round(time.perf_counter() - t0, 1)},
        "infill_recovery": recovery,
        "methods": results,
    }
    if args.details:
        write_details(args.details, parents, children, e_by_key)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(record, indent=2) + "\n")
    _print_summary(results, recovery, out)


def write_details(path, parents, children, e_by_key):
    """One CSV row per child: method, parent, swap, child formula, E_hull (empty: failed)."""
    import csv

    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["method", "parent_index", "parent_material_id", "parent_formula", "swap",
                      "child_formula", "e_above_hull"])
        for name, kids in children.items():
            for i, child in enumerate(kids):
                if child is None:
                    continue
                e = e_by_key[structure_hash(child)]
                out.writerow([name, i, parents[i].info.get("material_id", ""), parents[i].get_chemical_formula(),
                              child.info["swap"], child.get_chemical_formula(), "" if e is None else f"{e:.4f}"])


def reduced_formula(formula):
    """One spelling per composition: reduced, alphabetical (pymatgen)."""
    from pymatgen.core import Composition

    return Composition(formula).reduced_composition.alphabetical_formula.replace(" ", "")


def _known_formulas():
    """Reduced formulas of every MP-20 row (the CSV's pretty_formula column), read without CIF parsing."""
    known = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen's notes on noble-gas electronegativities
        for split in ("train", "val", "test"):
            known.update(reduced_formula(f) for f in csv_column(settings.mp20_path(split), "pretty_formula"))
    return known


if __name__ == "__main__":
    main()
