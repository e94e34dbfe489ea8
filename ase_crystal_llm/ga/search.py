"""Genetic-algorithm searches for stable crystals: :class:`GASearch` and :func:`run_search`.

A search is an ``ase_ga`` database (``PrepareDB`` / ``DataConnection``) and a loop:

1. under the database's lock, take unrelaxed candidates, or (when none are
   left) propose children: a parent from ``ase_ga``'s ``Population`` (the best
   distinct candidates, fitness-weighted), an operator drawn by weight, and a
   ``StructureMatcher`` check against every candidate so far, so that a
   duplicate never costs a relaxation;
2. relax the batch together (:func:`~ase_crystal_llm.evaluation.relaxation.relax_many`),
   storing each result as it finishes: energy above the hull, ``raw_score =
   -e_above_hull`` (``ase_ga``'s fitness), and the provenance in key-value pairs;
3. repeat until the budget of relaxations is spent.

Several processes (or machines, on a PostgreSQL database) can run the loop
on one search; a killed one's claims are taken over (:mod:`.database`).
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from collections import Counter
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers

from ase_crystal_llm.chemistry.validity import reduced_formula
from ase_crystal_llm.ga.database import SearchConnection, database_exists, search_lock
from ase_crystal_llm.ga.operators import LLMElementMutation, TemplateElementMutation
from ase_crystal_llm.ga.options import SearchOptions, operator_weights, parse_elements
from ase_crystal_llm.info_keys import MATERIAL_ID, RELAX_CONVERGED, RELAX_STEPS
from ase_crystal_llm.io.outputs import is_db_url
from ase_crystal_llm.options import document_options
from ase_crystal_llm.text.format import is_periodic

try:  # ase_ga is the GA's home since ASE 3.26; older ASE ships it as ase.ga
    from ase_ga.data import PrepareDB, split_description
    from ase_ga.element_mutations import RandomElementMutation
    from ase_ga.population import Population
    from ase_ga.standardmutations import PermutationMutation, StrainMutation
    from ase_ga.utilities import CellBounds, closest_distances_generator
except ImportError:  # pragma: no cover - depends on the installed ASE
    from ase.ga.data import PrepareDB, split_description
    from ase.ga.element_mutations import RandomElementMutation
    from ase.ga.population import Population
    from ase.ga.standardmutations import PermutationMutation, StrainMutation
    from ase.ga.utilities import CellBounds, closest_distances_generator

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from ase.calculators.calculator import Calculator

    from ase_crystal_llm.evaluation.hull import ReferenceHull
    from ase_crystal_llm.evaluation.metrics import NoveltyIndex

__all__ = [
    "FAILED_SCORE", "GASearch", "StructureComparator", "read_start", "run_search", "search_results",
    "stored_options", "summarize",
]


# raw_score of a candidate whose relaxation failed: below every real one; extinct=1 keeps it
# out of the population (ase_ga needs a finite score on every relaxed row).
FAILED_SCORE = -1000.0

# Proposals in a row that may come back empty or duplicate before a round gives up.
_TRIES_PER_CHILD = 25

# Strained cells keep their angles within these (degrees): flatter ones are not crystals worth a relaxation.
_CELL_BOUNDS = CellBounds(bounds={"phi": [20, 160], "chi": [20, 160], "psi": [20, 160]})

# Settings that must match when a search is continued (the rest may change between runs).
_FIXED = ("operators", "elements", "population", "potential", "fmax", "steps", "model", "temperature",
          "tolerance", "hull")

# Options a continuation takes from the database unless given again.
_RESUMED = ("operators", "elements", "population", "potential", "fmax", "steps", "model", "temperature",
            "tolerance", "seed", "data_dir")


class StructureComparator:
    """``ase_ga`` comparator: two candidates look alike when ``StructureMatcher`` fits them.

    Compositions are compared first (cheap); pymatgen's ``StructureMatcher``
    with its default tolerances decides among equal ones.
    """

    def __init__(self) -> None:
        from ase_crystal_llm.evaluation.metrics import structure_matcher

        self.matcher = structure_matcher()

    def looks_like(self, a1: Atoms, a2: Atoms) -> bool:
        from ase_crystal_llm.evaluation.metrics import structures_match

        if reduced_formula(a1) != reduced_formula(a2):
            return False
        return structures_match(a1, a2, self.matcher)


class _Permutation(PermutationMutation):
    """ase_ga's permutation on whole crystals; parents of one element have nothing to permute."""

    def get_new_individual(self, parents):
        if len(set(parents[0].numbers)) < 2:
            return None, "mutation: permutation needs two elements"
        return super().get_new_individual(parents)


class _RandomElement(RandomElementMutation):
    """ase_ga's random element mutation; a parent with no atom in the pool is skipped
    (ase_ga would look for one forever)."""

    def __init__(self, element_pool, rng):
        super().__init__(list(element_pool), rng=rng)
        self.pool = set(element_pool)

    def get_new_individual(self, parents):
        if not self.pool.intersection(parents[0].get_chemical_symbols()) or len(self.pool) < 2:
            return None, "mutation: no atom of the element pool"
        return super().get_new_individual(parents)


class GASearch:
    """One search: its database, operators, potential and hull.

    Parameters
    ----------
    database : str or path
        An ase.db file or a server address (``postgresql://...``).
    options : SearchOptions, optional
        How to propose, relax and score (:class:`~.options.SearchOptions`).
    hull : ReferenceHull, optional
        Judges every candidate (default: MP-20 and the MP elemental references,
        :meth:`ReferenceHull.from_mp20`).
    calculator : ase Calculator, optional
        Overrides ``options.potential`` (e.g. EMT in tests).
    generator : CrystalGenerator, optional
        A loaded model for the ``llm`` operator (default: ``options.model`` is loaded).
    threads : int, optional
        torch CPU threads for the model and the relaxations.
    """

    def __init__(self, database: str | os.PathLike, options: SearchOptions | None = None, *,
                 hull: ReferenceHull | None = None, calculator: Calculator | None = None,
                 generator: Any = None, threads: int | None = None) -> None:
        self.database = str(database)
        self.options = options or SearchOptions()
        self.weights = operator_weights(self.options.operators)
        self.elements = parse_elements(self.options.elements) if self.options.elements else None
        self._hull, self._calculator, self._generator = hull, calculator, generator
        self.threads = threads
        self.connection: SearchConnection | None = None
        self.stopped: str | None = None

    # ------------------------------------------------------------------ set-up
    @property
    def hull(self) -> ReferenceHull:
        if self._hull is None:
            from ase_crystal_llm.evaluation.hull import ReferenceHull

            self._hull = ReferenceHull.from_mp20(self.options.data_dir)
        return self._hull

    @property
    def calculator(self) -> Calculator:
        if self._calculator is None:
            from ase_crystal_llm.evaluation.potentials import get_calculator

            self._calculator = get_calculator(self.options.potential)
        return self._calculator

    def settings(self) -> dict[str, Any]:
        """What identifies this search: checked again when it is continued."""
        from ase_crystal_llm.evaluation.potentials import potential_info

        out = {k: v for k, v in asdict(self.options).items() if k in _FIXED}
        out["operators"] = self.weights
        out["elements"] = self.elements
        out["potential"] = potential_info(self.calculator)[0]
        out["model"] = self._model_name() if "llm" in self.weights else None
        out["hull"] = self.hull.name
        return out

    def create(self, start: Iterable[Atoms]) -> None:
        """Write a new search database holding the starting structures (unrelaxed)."""
        start = _check_start(start, self.elements)
        if database_exists(self.database):
            raise FileExistsError(f"{self.database} already holds a search: continue it with resume, "
                                  "or start again with overwrite")
        prep = PrepareDB(self.database, population_size=self.options.population, search=self.settings(),
                         options={k: v for k, v in asdict(self.options).items() if k in _RESUMED})
        for atoms in start:
            kvp = {"composition": reduced_formula(atoms), "operator": "start"}
            if isinstance(atoms.info.get(MATERIAL_ID), str):
                kvp[MATERIAL_ID] = atoms.info[MATERIAL_ID]
            prep.add_unrelaxed_candidate(_bare(atoms), **kvp)
        self.connection = SearchConnection(self.database, lease=self.options.lease)

    def open(self) -> None:
        """Join an existing search; its fixed settings must equal this one's."""
        connection = SearchConnection(self.database, lease=self.options.lease)
        stored = connection.settings().get("search")
        if stored is None:
            raise ValueError(f"{self.database} is not a crystal-llm search (no search settings in its first row)")
        mine = _as_stored(self.settings())
        differ = sorted(k for k in _FIXED if stored.get(k) != mine.get(k))
        if differ:
            detail = "; ".join(f"{k}: {stored.get(k)!r} there, {mine.get(k)!r} now" for k in differ)
            raise ValueError(f"{self.database} was started with other settings ({detail})")
        self.connection = connection

    # ------------------------------------------------------------------ the loop
    def run(self, budget: int) -> dict[str, Any]:
        """Relax candidates until ``budget`` relaxations are spent in the whole search.

        Returns :func:`summarize` of the search.  ``self.stopped`` says why a
        search ended before its budget (the operators found nothing new).
        """
        if int(budget) != budget or budget <= 0:
            raise ValueError(f"budget must be a positive whole number of relaxations, got {budget!r}")
        if self.connection is None:
            self.open()
        connection = self.connection
        rng = self._rng()
        operators = self._operators(rng)
        population = Population(connection, self.options.population, StructureComparator(), use_extinct=True,
                                rng=rng)
        known = _KnownStructures()
        bar = _progress_bar(budget, connection.count_relaxed(), self.options.progress)
        try:
            while True:
                with connection.locked():
                    connection.release_stale()
                    done, in_flight = connection.count_relaxed(), len(connection.claims())
                    room = min(self.options.batch_size, int(budget) - done - in_flight)
                    if room <= 0:
                        break
                    batch = connection.unrelaxed(room)
                    if len(batch) < room:
                        known.update(connection)
                        batch += self._propose(room - len(batch), population, operators, known, rng)
                    for candidate in batch:
                        connection.claim(candidate)
                if not batch:
                    if in_flight:  # another worker's results will bring new parents
                        time.sleep(2.0)
                        continue
                    self.stopped = (f"the operators proposed nothing new in {_TRIES_PER_CHILD} tries per child "
                                    if population.pop else "no relaxed candidate can be a parent (every relaxation "
                                    "failed) ") + f"({done} of {budget} relaxations done)"
                    break
                self._relax(batch, bar)
        finally:
            if bar is not None:
                bar.close()
        return summarize(search_results(self.database))

    def _rng(self):
        # A file search is reproducible for a seed (continuations draw anew from where it stands);
        # workers sharing a server database also differ by process, or they would propose alike.
        rows = self.connection.c.count()
        entropy = [int(self.options.seed), rows] + ([os.getpid()] if is_db_url(self.database) else [])
        return np.random.RandomState(np.random.SeedSequence(entropy).generate_state(1)[0])  # ase_ga: legacy API

    # ------------------------------------------------------------------ proposals
    def _operators(self, rng):
        pool = self.elements
        made = {}
        for name in self.weights:
            if name == "llm":
                made[name] = LLMElementMutation(self.generator, element_pool=pool, temperature=self.options.temperature,
                                                tolerance=self.options.tolerance, rng=rng)
            elif name == "template":
                made[name] = TemplateElementMutation(element_pool=pool, tolerance=self.options.tolerance, rng=rng)
            elif name == "random":
                made[name] = _RandomElement(pool or self._start_elements(), rng)
            elif name == "strain":
                made[name] = StrainMutation(_blmin(), cellbounds=_CELL_BOUNDS, stddev=0.3, rng=rng)
            elif name == "permutation":
                made[name] = _Permutation(None, test_dist_to_slab=False, blmin=_blmin(), rng=rng)
        return made

    def _propose(self, n, population, operators, known, rng):
        """Up to ``n`` new, non-duplicate children written as unrelaxed candidates."""
        started = time.perf_counter()
        population.update()
        if not population.pop:
            return []
        names = list(operators)
        weights = np.array([self.weights[k] for k in names], dtype=float)
        children, tries = [], 0
        while len(children) < n and tries < _TRIES_PER_CHILD * n:
            tries += 1
            parent = _parent(population, rng)
            name = names[rng.choice(len(names), p=weights / weights.sum())]
            child, description = operators[name].get_new_individual([parent])
            if child is None or not is_periodic(child) or known.contains(child):
                continue
            kind, text = split_description(description)  # as ase_ga writes them: the relaxed row keeps them
            child.info["key_value_pairs"].update({kind: 1, "description": text})
            self._label(child, name, parent)
            known.add(child)
            children.append((child, description))
        # The round's time (parents, operators, duplicate checks, failed tries) shared by its children.
        seconds = (time.perf_counter() - started) / max(1, len(children))
        for child, description in children:
            child.info["key_value_pairs"]["propose_seconds"] = seconds
            self.connection.add_unrelaxed_candidate(child, description=description)
        return [child for child, _ in children]

    def _label(self, child, name, parent):
        child.info["data"].pop("element_swap", None)  # already in the description
        child.info["key_value_pairs"].update(
            operator=name, parent_id=int(parent.info["confid"]), composition=reduced_formula(child),
            model=self._model_name() if name == "llm" else "none")

    @property
    def generator(self):
        if self._generator is None:
            from ase_crystal_llm.generation.generator import CrystalGenerator

            self._generator = CrystalGenerator.from_pretrained(self.options.model, threads=self.threads)
        return self._generator

    def _model_name(self):
        model = self._generator if self._generator is not None else self.options.model
        if model is None:
            return "default"
        if isinstance(model, (str, os.PathLike)):
            return str(model)
        return str(getattr(model, "name_or_path", None) or type(model).__name__)

    def _start_elements(self):
        rows = self.connection.c.select(operator="start")
        return sorted({s for row in rows for s in row.symbols})

    # ------------------------------------------------------------------ relaxation and scores
    def _relax(self, batch, bar):
        from ase_crystal_llm.evaluation.relaxation import relax_many

        clock = [time.perf_counter()]

        def store(index, relaxed):
            now = time.perf_counter()
            self._store(batch[index], relaxed, now - clock[0])
            clock[0] = now
            if bar is not None:
                bar.update(1)

        relax_many(batch, self.calculator, fmax=self.options.fmax, steps=self.options.steps,
                   batch_size=len(batch), threads=self.threads, on_result=store)

    def _store(self, candidate, relaxed, seconds):
        from ase_crystal_llm.evaluation.pipeline import e_above_hull_many
        from ase_crystal_llm.evaluation.potentials import potential_info

        (e_hull,), (error,) = e_above_hull_many([relaxed], self.hull)
        kvp = candidate.info["key_value_pairs"]
        kvp.update(potential=potential_info(self.calculator)[0], hull=self.hull.name, relax_seconds=float(seconds),
                   relax_steps=int(relaxed.info.get(RELAX_STEPS, 0)),
                   relax_converged=bool(relaxed.info.get(RELAX_CONVERGED, False)))
        if e_hull is None:
            kvp.update(relax_failed=1, extinct=1, raw_score=FAILED_SCORE)
            candidate.info["data"]["relax_error"] = error
            result = candidate
        else:
            kvp.update(e_above_hull=float(e_hull), raw_score=-float(e_hull),
                       formation_energy=float(self.hull.formation_energy(relaxed)))
            result = relaxed.copy()
            result.calc = relaxed.calc
            result.info = candidate.info
        self.connection.add_relaxed_step(result)


# -------------------------------------------------------------------------- entry point
@document_options(SearchOptions)
def run_search(start: str | os.PathLike | Iterable[Atoms] | None, database: str | os.PathLike, budget: int, *,
               resume: bool = False, overwrite: bool = False, hull: ReferenceHull | None = None,
               calculator: Calculator | None = None, generator: Any = None, threads: int | None = None,
               **options: Any) -> dict[str, Any]:
    """Run (or continue) a genetic-algorithm search for stable crystals.

    Parameters
    ----------
    start : str, path, list of ase.Atoms or None
        Starting structures (see :func:`read_start` for strings); ``None`` only
        when continuing.
    database : str or path
        The search's ase.db file or server address; an ``ase_ga`` database.
    budget : int
        Relaxations in the whole search (starting structures included);
        continuing to a larger budget relaxes the difference.
    resume : bool
        Continue the search in ``database`` (or start it when it does not exist
        yet: every worker of a shared search is started this way).  Options not
        given (or ``None``) keep the values the search was started with; those
        given must agree with them, except ``batch_size``, ``lease``, ``progress``.
    overwrite : bool
        Delete an existing database file first.
    hull, calculator, generator, threads
        As for :class:`GASearch`.
    {options}

    Returns
    -------
    dict
        :func:`summarize` of the whole search, plus ``stopped`` (why it ended
        early, or ``None``).
    """
    unknown = set(options) - {f.name for f in fields(SearchOptions)}
    if unknown:
        raise TypeError(f"run_search() got unknown options: {', '.join(sorted(unknown))}")
    if overwrite and not is_db_url(database) and Path(database).exists():
        Path(database).unlink()
    given = {k: v for k, v in options.items() if v is not None}
    if resume and database_exists(database):  # what is not given again comes from the search itself
        given = {**stored_options(database), **given}
    search = GASearch(database, SearchOptions(**given), hull=hull, calculator=calculator, generator=generator,
                      threads=threads)
    if resume and database_exists(database):
        search.open()
    else:
        if start is None:
            raise ValueError("no starting structures: give some, or continue an existing search with resume")
        structures = list(start) if not isinstance(start, (str, os.PathLike)) else [start]
        if all(isinstance(s, (str, os.PathLike)) for s in structures):
            structures = read_start(structures, search.options.data_dir)
        with search_lock(database):
            if resume and database_exists(database):  # another worker created it meanwhile
                search.open()
            else:
                search.create(structures)
    summary = search.run(budget)
    summary["stopped"] = search.stopped
    return summary


def stored_options(database: str | os.PathLike) -> dict[str, Any]:
    """The options a search was started with (those a continuation keeps)."""
    return dict(SearchConnection(database).settings().get("options", {}))


def read_start(spec: str | os.PathLike | Sequence[str | os.PathLike], data_dir: str | os.PathLike | None = None,
               ) -> list[Atoms]:
    """Starting structures: files (any ``ase.io`` format, ``.db``, CSV), or MP-20 formulas / chemical systems.

    A string that is not an existing file is looked up in MP-20
    (:func:`~ase_crystal_llm.data.datasets.select_mp20`): ``"SrTiO3"`` gives
    its rows, ``"Sr-Ti-O"`` every row made of exactly those elements.
    """
    from ase_crystal_llm.data.datasets import read_structures, select_mp20

    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out = []
    for one in specs:
        if Path(one).exists():
            found = read_structures(one, canonical=False)
            if not found:
                raise ValueError(f"no structures in {one}")
            out += found
        else:
            out += select_mp20(str(one), data_dir=data_dir)
    return out


# -------------------------------------------------------------------------- results
def search_results(database: str | os.PathLike) -> list[dict[str, Any]]:
    """One dict per relaxed candidate, in the order they finished.

    Keys: ``gaid``, ``formula``, ``operator``, ``parent_id``, ``e_above_hull``
    (``None`` when the relaxation failed), ``relax_seconds``,
    ``propose_seconds`` and ``atoms`` (the relaxed structure).
    """
    import ase.db

    db = ase.db.connect(str(database))
    out = []
    for row in db.select(relaxed=1, sort="id"):
        failed = bool(row.get("relax_failed", 0))
        out.append({
            "gaid": int(row.gaid), "formula": row.get("composition") or row.formula,
            "operator": row.get("operator", "start"), "parent_id": row.get("parent_id"),
            "e_above_hull": None if failed else float(row.e_above_hull),
            "relax_seconds": float(row.get("relax_seconds", 0.0)),
            "propose_seconds": float(row.get("propose_seconds", 0.0)), "atoms": row.toatoms(),
        })
    return out


def summarize(results: Sequence[dict[str, Any]], novelty: NoveltyIndex | None = None, *,
              thresholds: Sequence[float] = (0.0, 0.1), best: int = 10) -> dict[str, Any]:
    """Counts of a search's results (:func:`search_results`).

    ``found``: for each threshold, the children (not starting structures) below
    it, ``distinct`` (no ``StructureMatcher`` match among earlier results)
    and, with ``novelty``, ``novel`` too (no match in the known crystals).
    ``best``: the lowest distinct results.  ``time``: seconds spent
    proposing and relaxing (relaxation includes the hull).
    """
    from ase_crystal_llm.evaluation.metrics import unique_flags

    distinct = unique_flags([r["atoms"] for r in results]) if results else []
    ok = [r["e_above_hull"] is not None for r in results]
    novel = [None] * len(results)
    found = {}
    for t in thresholds:
        rows = [i for i, r in enumerate(results) if ok[i] and r["operator"] != "start" and _below(r["e_above_hull"], t)]
        entry = {"children": len(rows), "distinct": sum(distinct[i] for i in rows)}
        if novelty is not None:
            for i in rows:
                if distinct[i] and novel[i] is None:
                    novel[i] = novelty.is_novel(results[i]["atoms"])
            entry["distinct_novel"] = sum(bool(distinct[i] and novel[i]) for i in rows)
        found[_threshold_key(t)] = entry
    ranked = sorted((i for i in range(len(results)) if ok[i] and distinct[i]), key=lambda i: results[i]["e_above_hull"])
    return {
        "relaxations": len(results), "failed": ok.count(False),
        "children": sum(r["operator"] != "start" for r in results),
        "by_operator": dict(Counter(r["operator"] for r in results)),
        "found": found,
        "best": [{"gaid": results[i]["gaid"], "formula": results[i]["formula"],
                  "e_above_hull": results[i]["e_above_hull"], "operator": results[i]["operator"],
                  **({"novel": novel[i]} if novel[i] is not None else {})} for i in ranked[:best]],
        "time": {"propose_seconds": sum(r["propose_seconds"] for r in results),
                 "relax_seconds": sum(r["relax_seconds"] for r in results)},
    }


def _below(e_hull, threshold):
    """Stable is on or below the hull (<= 0); any other threshold is strict (metastable: < 0.1)."""
    return e_hull <= 0 if threshold == 0 else e_hull < threshold


def _threshold_key(t):
    return "stable" if t == 0 else f"below_{t:g}"


# -------------------------------------------------------------------------- helpers
class _KnownStructures:
    """Every candidate of the search so far (unrelaxed and relaxed), by reduced formula."""

    def __init__(self):
        from ase_crystal_llm.evaluation.metrics import NoveltyIndex

        self.index = NoveltyIndex([])
        self.last_id = 0

    def update(self, connection):
        for row in connection.c.select(f"id>{self.last_id}", sort="id"):
            self.last_id = row.id
            if row.natoms:  # claims and the settings row hold no structure
                self.index.add(row.toatoms())

    def contains(self, atoms):
        return not self.index.is_novel(atoms)

    def add(self, atoms):
        self.index.add(atoms)


def _parent(population, rng):
    """ase_ga's fitness-weighted choice; uniform while all scores are equal (ase_ga divides by their spread)."""
    scores = [a.info["key_value_pairs"]["raw_score"] for a in population.pop]
    if max(scores) - min(scores) < 1e-9:
        return population.pop[rng.randint(len(scores))].copy()
    return population.get_one_candidate()


def _check_start(start, elements):
    start = list(start)
    if not start:
        raise ValueError("no starting structures")
    for i, atoms in enumerate(start):
        if not isinstance(atoms, Atoms) or not is_periodic(atoms):
            raise ValueError(f"starting structure {i} is not a crystal (periodic in 3D)")
        if elements is not None:
            outside = sorted(set(atoms.get_chemical_symbols()) - set(elements), key=atomic_numbers.get)
            if outside:
                raise ValueError(f"starting structure {i} ({atoms.get_chemical_formula()}) has "
                                 f"{', '.join(outside)}, outside the search's elements {','.join(elements)}")
    return start


def _bare(atoms):
    """Only what a candidate is: numbers, positions, cell (ase_ga keeps its own info)."""
    return Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=True)


def _as_stored(settings):
    """``settings`` as they read back from the database's JSON (tuples become lists)."""
    import json

    return json.loads(json.dumps(settings))


@functools.cache
def _blmin():
    # Any element may enter through element swaps: minimum distances for all of them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return closest_distances_generator(list(range(1, 95)), ratio_of_covalent_radii=0.6)


def _progress_bar(total, done, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=int(total), initial=min(done, int(total)), desc="relaxations", unit="relax")

