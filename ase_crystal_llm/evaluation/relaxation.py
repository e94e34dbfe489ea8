"""Relax one or many crystals with an ASE calculator.

``relax`` runs FIRE on ``FrechetCellFilter`` for one structure; ``relax_many``
is the engine for many: a batched backend (:mod:`.batched`: many structures
share one graph per forward pass, each keeps its own FIRE and
``FrechetCellFilter`` state), worker processes, and an ase.db cache keyed by
structure hash (:class:`RelaxCache`) so interrupted runs resume.  Relaxations
that explode (NaN, collapsed atoms, runaway cell) are returned marked
``relax_failed``, never dropped.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator

from ase_crystal_llm import settings
from ase_crystal_llm.evaluation.batched import (
    BatchEvaluator,
    _CachedResults,
    _failed_copy,
    _RelaxJob,
    _small_matrix_threads,
    batch_evaluator,
    run_batched,
)
from ase_crystal_llm.evaluation.potentials import get_calculator, potential_info
from ase_crystal_llm.info_keys import ENERGY, RELAX_FAILED
from ase_crystal_llm.io.files import plain
from ase_crystal_llm.settings import torch_threads
from ase_crystal_llm.text.format import is_periodic

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

__all__ = [
    "RelaxCache", "relax", "relax_key", "relax_many", "structure_hash",
]


def relax(atoms: Atoms, calculator: Calculator | str | os.PathLike, fmax: float = 0.1, steps: int = 500,
          threads: int | None = None) -> Atoms:
    """Relax cell and positions with FIRE on ``FrechetCellFilter``.

    Parameters
    ----------
    atoms : ase.Atoms
        Periodic structure; not modified.
    calculator : Calculator or str
        Anything :func:`get_calculator` accepts.
    fmax : float
        Force criterion in eV/A (the filter also scales the stress).
    steps : int
        Maximum number of FIRE steps.
    threads : int, optional
        torch CPU threads (default: one per idle core, :func:`settings.default_threads`).

    Returns
    -------
    ase.Atoms
        A new structure with a ``SinglePointCalculator`` (total energy, forces,
        stress) and ``info`` keys ``energy``, ``relax_converged``,
        ``relax_steps``, ``potential``, ``energy_scale``; a structure that
        explodes comes back unrelaxed with ``relax_failed=True`` and
        ``relax_error``.
    """
    _check_periodic(atoms)
    calculator = get_calculator(calculator)
    job = _RelaxJob(atoms, fmax, steps)
    slot = _CachedResults()
    job.attach(slot)
    try:
        evaluator = BatchEvaluator(calculator)
        with _small_matrix_threads(), torch_threads(threads or settings.default_threads()):
            while not job.done:
                slot.store(job.atoms, *evaluator.evaluate([job.atoms])[0])
                job.advance()
    except Exception as err:  # noqa: BLE001 - reported on the structure, not raised
        job.fail(err)
    return job.result(*potential_info(calculator))


def relax_many(
    structures: Iterable[Atoms],
    potential: str | os.PathLike | Calculator = "m3gnet",
    *,
    fmax: float = 0.1,
    steps: int = 500,
    workers: int | None = None,
    cache: str | os.PathLike | None = None,
    batch_size: int = 32,
    backend: str = "auto",
    device: str | None = None,
    threads: int | None = None,
    progress: bool = False,
    on_result: Callable[[int, Atoms], None] | None = None,
) -> list[Atoms]:
    """Relax many structures: batched, cached, optionally in worker processes.

    Parameters
    ----------
    structures : iterable of ase.Atoms
    potential : str or Calculator
        As for :func:`get_calculator`.  With ``workers > 1`` each process loads
        its own copy of a named potential; a calculator object is pickled to them.
    fmax, steps : float, int
        As for :func:`relax`.
    workers : int, optional
        Processes on CPU (default 1: torch already uses every core).
    cache : str or path, optional
        An ase.db file; finished relaxations are stored there keyed by structure
        hash, potential and settings, and reused on the next call.
    batch_size : int
        Structures relaxed together (``backend="batched"``).
    backend : {"auto", "batched", "serial"}
        ``"batched"`` puts up to ``batch_size`` structures in one graph per
        forward pass, each with its own FIRE state; ``"serial"`` is one
        structure at a time (same optimiser, same results); ``"auto"`` batches
        when the potential supports it.
    device : str, optional
        torch device (default CPU).
    threads : int, optional
        torch CPU threads while relaxing (default: one per idle core in this
        process, :func:`settings.default_threads`; cores / workers in workers).
        Threads beyond the idle cores wait on each other: on a busy 2-core
        machine 2 threads relaxed ~24x slower than 1.
    progress : bool
        Show a tqdm progress bar.
    on_result : callable, optional
        Called as ``on_result(index, relaxed)`` as each structure finishes (cached and
        rejected ones first), so that a caller can store it before the rest are done.

    Returns
    -------
    list of ase.Atoms
        Same order as the input; a failed one has ``info[RELAX_FAILED] = True``
        and ``info[RELAX_ERROR]``.
    """
    structures = list(structures)
    if backend not in ("auto", "batched", "serial"):
        raise ValueError(f"unknown relaxation backend {backend!r}: use auto, batched or serial")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    workers = 1 if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    calculator = get_calculator(potential, device=device)
    name, scale = potential_info(calculator)
    store = RelaxCache(cache) if cache is not None else None
    results = [None] * len(structures)
    todo = []
    for i, atoms in enumerate(structures):
        try:
            _check_periodic(atoms)
        except (ValueError, TypeError) as err:
            results[i] = _failed_copy(atoms, err, name, scale)
            if on_result is not None:
                on_result(i, results[i])
            continue
        key = relax_key(atoms, name, fmax, steps)
        hit = store.get(key) if store is not None else None
        if hit is not None:
            results[i] = _restore_info(hit, atoms)
            if on_result is not None:
                on_result(i, results[i])
        else:
            todo.append((i, key))

    bar = _progress(len(structures), len(structures) - len(todo), progress)

    def finished(index, key, relaxed):
        results[index] = relaxed
        if store is not None:
            store.put(key, relaxed)
        if on_result is not None:
            on_result(index, relaxed)
        if bar is not None:
            bar.update(1)

    settings_ = dict(fmax=fmax, steps=steps, batch_size=int(batch_size), backend=backend)
    if workers == 1 or len(todo) <= 1:
        with torch_threads(threads or settings.default_threads()):
            _relax_indices(structures, todo, calculator, settings_, finished)
    else:
        spec = potential if isinstance(potential, Calculator) else str(potential)
        _relax_in_processes(structures, todo, spec, device, workers, threads, settings_, finished)
    if bar is not None:
        bar.close()
    return results


def _relax_indices(structures, todo, calculator, opts, finished):
    """Relax ``structures[i]`` for ``(i, key)`` in todo in this process."""
    evaluator = batch_evaluator(calculator)
    batched = opts["backend"] == "batched" or (opts["backend"] == "auto" and evaluator.batched)
    size = opts["batch_size"] if batched else 1
    if not batched:
        evaluator = BatchEvaluator(calculator)
    info = potential_info(calculator)
    with _small_matrix_threads():
        run_batched(
            ((key, structures[i], i) for i, key in todo),
            evaluator,
            fmax=opts["fmax"],
            steps=opts["steps"],
            batch_size=size,
            potential=info,
            finished=lambda tag, relaxed: finished(tag[1], tag[0], relaxed),
        )


def _check_periodic(atoms):
    if not isinstance(atoms, Atoms):
        raise TypeError(f"expected ase.Atoms, got {type(atoms).__name__}")
    if len(atoms) == 0:
        raise ValueError("empty structure: nothing to relax")
    if not is_periodic(atoms):
        raise ValueError("structure is not periodic in 3D (pbc and a full cell are needed to relax a crystal)")


def _relax_in_processes(structures, todo, spec, device, workers, threads, opts, finished):
    """Chunks of structures in worker processes; results saved as they arrive."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    chunk = max(1, min(opts["batch_size"], -(-len(todo) // workers)))
    pieces = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
    with ProcessPoolExecutor(
        workers, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(spec, device, threads)
    ) as pool:
        futures = [pool.submit(_worker_relax, [(i, key, structures[i]) for i, key in piece], opts) for piece in pieces]
        try:
            for future in as_completed(futures):
                for index, key, relaxed in future.result():
                    finished(index, key, relaxed)  # cached at once: a crash later loses nothing
        except BrokenProcessPool as err:
            raise RuntimeError(f"a relaxation worker died ({err}); finished structures are in the cache") from err


_WORKER = {}


def _worker_init(spec, device, threads):
    import sys

    _WORKER["calculator"] = get_calculator(spec, device=device)
    if "torch" in sys.modules:  # only torch potentials need it; EMT & co. stay light
        sys.modules["torch"].set_num_threads(threads)


def _worker_relax(items, opts):
    out = []
    structures = {i: atoms for i, _, atoms in items}
    _relax_indices(
        structures,
        [(i, key) for i, key, _ in items],
        _WORKER["calculator"],
        opts,
        lambda index, key, relaxed: out.append((index, key, relaxed)),
    )
    return out


def structure_hash(atoms: Atoms, decimals: int = 5) -> str:
    """sha256 of numbers, pbc, cell and fractional positions (rounded)."""
    digest = hashlib.sha256()
    digest.update(np.asarray(atoms.numbers, dtype=np.int64).tobytes())
    digest.update(np.asarray(atoms.pbc, dtype=np.int8).tobytes())
    digest.update(np.round(np.asarray(atoms.cell), decimals).astype(np.float64).tobytes())
    scaled = np.round(atoms.get_scaled_positions(wrap=True) % 1.0, decimals) % 1.0
    digest.update(scaled.astype(np.float64).tobytes())
    return digest.hexdigest()


def relax_key(atoms: Atoms, potential_name: str, fmax: float, steps: int) -> str:
    """Cache key of one relaxation: structure hash plus potential and settings."""
    text = f"{structure_hash(atoms)}|{potential_name}|{float(fmax):g}|{int(steps)}"
    return hashlib.sha256(text.encode()).hexdigest()[:40]


class RelaxCache:
    """Finished relaxations in an ase.db, one row per key (written as they finish)."""

    # "energy" is reserved in ase.db: it lives in the row's calculator results.
    _INFO = ("relax_converged", "relax_steps", "potential", "energy_scale", "relax_failed", "relax_error")

    def __init__(self, path: str | os.PathLike) -> None:
        from ase_crystal_llm.io.outputs import connect_database

        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = connect_database(self.path, type="db")  # no lock file: a killed run's would block a resume

    def get(self, key: str) -> Atoms | None:
        # Two processes sharing a cache (or one relaxing a duplicate sample) may both have
        # written a key: any of its rows is the same relaxation.
        row = next(iter(self.db.select(relax_key=key, limit=1)), None)
        if row is None:
            return None
        atoms = row.toatoms(add_additional_information=False)
        info = {k: row.key_value_pairs[k] for k in self._INFO if k in row.key_value_pairs}
        for flag in ("relax_converged", "relax_failed"):
            if flag in info:
                info[flag] = bool(info[flag])
        atoms.info.update(info)
        if info.get(RELAX_FAILED):
            atoms.calc = None
        elif row.get("energy") is not None:
            atoms.info[ENERGY] = float(row.energy)
        return atoms

    def put(self, key: str, atoms: Atoms) -> None:
        pairs = {k: plain(atoms.info[k]) for k in self._INFO if k in atoms.info}
        self.db.write(atoms, relax_key=key, **pairs)

    def __len__(self):
        return self.db.count()


def _restore_info(cached, original):
    """A cached result with the input's own info (material_id, ...) carried over."""
    info = dict(original.info)
    info.update(cached.info)
    cached.info = info
    return cached


def _progress(total, done, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="relax", unit="structure")
