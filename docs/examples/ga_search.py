"""A genetic-algorithm search for stable ABO3 perovskites with LLM-guided element mutation.

Every candidate is relaxed with M3GNet and scored by ``raw_score = -E_hull``
(energy above the MP-20 convex hull, eV/atom).  New candidates come from an
``OperationSelector`` mixing the language model's element swap
(:class:`~ase_crystal_llm.infill.LLMElementMutation`) with ASE's own
``StrainMutation`` and ``RattleMutation``.  Without a model the template swap
(:class:`~ase_crystal_llm.infill.TemplateElementMutation`, the paper's
baseline) takes the model's place.

Run (CPU, a few minutes)::

    python docs/examples/ga_search.py --model path/to/model --out ga_run

The database ``ga_run/ga.db`` is an ordinary ase_ga database: ``ase db
ga_run/ga.db relaxed=1 -s raw_score-`` lists the candidates, best first.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers
from ase_ga import set_raw_score
from ase_ga.data import DataConnection, PrepareDB
from ase_ga.offspring_creator import OperationSelector
from ase_ga.population import Population
from ase_ga.standard_comparators import CompositionComparator, RawScoreComparator, SequentialComparator
from ase_ga.standardmutations import RattleMutation, StrainMutation
from ase_ga.utilities import CellBounds, closest_distances_generator

from ase_crystal_llm.evaluation.hull import ReferenceHull
from ase_crystal_llm.evaluation.potentials import get_calculator
from ase_crystal_llm.evaluation.relaxation import relax
from ase_crystal_llm.ga.operators import LLMElementMutation, TemplateElementMutation

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


def load_operator(model, pool, temperature, rng):
    """The LLM element swap, or the template swap when no model can be loaded."""
    try:
        from ase_crystal_llm.generation.generator import CrystalGenerator

        generator = CrystalGenerator.from_pretrained(model)
    except (FileNotFoundError, OSError, ImportError, ValueError) as err:
        print(f"no model ({' '.join(str(err).split())}); using the template swap baseline instead", file=sys.stderr)
        return TemplateElementMutation(element_pool=pool, rng=rng)
    # The pool is the search space: let the model choose any element of the site's group.
    return LLMElementMutation(generator, element_pool=pool, temperature=temperature,
                              restrict_to_template=False, rng=rng)


class Evaluator:
    """Relax with M3GNet, then raw_score = -E_hull; failures leave the search."""

    def __init__(self, potential="m3gnet", fmax=0.1, steps=300):
        self.calculator = get_calculator(potential)
        self.hull = ReferenceHull.from_mp20()
        self.fmax, self.steps = fmax, steps

    def __call__(self, candidate):
        relaxed = relax(candidate, self.calculator, fmax=self.fmax, steps=self.steps)
        if relaxed.info.get("relax_failed"):
            return False
        e_hull = self.hull.e_above_hull(relaxed)
        # The GA keeps its own Atoms (confid, key_value_pairs): copy the result in.
        candidate.set_cell(relaxed.cell)
        candidate.set_positions(relaxed.positions)
        candidate.calc = relaxed.calc
        candidate.info["key_value_pairs"]["e_above_hull"] = float(e_hull)
        candidate.info["key_value_pairs"]["composition"] = candidate.get_chemical_formula(mode="metal")
        set_raw_score(candidate, -float(e_hull))
        return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="crystal-llm model directory (default: the shipped model)")
    parser.add_argument("--out", default="ga_run", help="run folder (must not hold a ga.db yet, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="delete the ga.db of an earlier run in --out")
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--children", type=int, default=6, help="children per generation")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (5-atom cells: more threads mostly wait on each other)")
    args = parser.parse_args(argv)
    db = Path(args.out) / "ga.db"
    if db.exists():
        if not args.overwrite:
            parser.error(f"{db} already exists: pass --overwrite to start again, or choose another --out")
        db.unlink()
    import torch

    torch.set_num_threads(args.threads)

    db.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(args.seed)  # ase_ga's Population uses the legacy API
    pool = [A_SITE, B_SITE]  # A and B sites swap within their own group; O stays
    start = time.perf_counter()

    evaluate = Evaluator()
    swap = load_operator(args.model, pool, args.temperature, rng)

    # Starting population: random cubic perovskites of the pool.
    prep = PrepareDB(str(db), stoichiometry=[atomic_numbers[e] for e in ["Ca", "Ti", "O", "O", "O"]])
    for _ in range(args.population):
        prep.add_unrelaxed_candidate(perovskite(rng.choice(A_SITE), rng.choice(B_SITE)))
    da = DataConnection(str(db))
    while da.get_number_of_unrelaxed_candidates():
        candidate = da.get_an_unrelaxed_candidate()
        if evaluate(candidate):
            da.add_relaxed_step(candidate)

    blmin = closest_distances_generator([atomic_numbers[e] for e in A_SITE + B_SITE + ["O"]],
                                        ratio_of_covalent_radii=0.6)
    bounds = CellBounds(bounds={"phi": [35, 145], "chi": [35, 145], "psi": [35, 145],
                                "a": [3, 12], "b": [3, 12], "c": [3, 12]})
    strain = StrainMutation(blmin, cellbounds=bounds, stddev=0.2, rng=rng)
    rattle = RattleMutation(blmin, n_top=5, rattle_strength=0.4, rng=rng)
    operators = OperationSelector([3, 1, 1], [swap, strain, rattle], rng=rng)
    # Duplicates: same composition and E_hull within 5 meV/atom.
    comparator = SequentialComparator([CompositionComparator(), RawScoreComparator(dist=0.005)], [0, 0])
    population = Population(da, population_size=args.population, comparator=comparator, rng=rng)
    strain.update_scaling_volume(population.pop)

    for generation in range(1, args.generations + 1):
        for _ in range(args.children):
            parent, _ = population.get_two_candidates()
            child, description = operators.get_new_individual([parent])
            if child is None:
                continue
            da.add_unrelaxed_candidate(child, description=description)
            if evaluate(child):
                da.add_relaxed_step(child)
        population.update()
        strain.update_scaling_volume(population.pop)
        best = population.pop[0]
        print(f"generation {generation}: best {best.get_chemical_formula(mode='metal')} "
              f"E_hull = {-best.info['key_value_pairs']['raw_score']:.3f} eV/atom "
              f"({time.perf_counter() - start:.0f} s)")

    print(f"\n{'formula':<10} {'E_hull (eV/atom)':>16}  origin")
    for atoms in population.pop:
        kvp = atoms.info["key_value_pairs"]
        print(f"{atoms.get_chemical_formula(mode='metal'):<10} {-kvp['raw_score']:>16.3f}  {kvp.get('origin', '')}")
    print(f"\nall candidates: {db}  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
