"""The batched relaxation engine: many FIRE relaxations in lockstep.

Each structure keeps its own ASE ``FIRE`` and ``FrechetCellFilter`` state
(:class:`_RelaxJob`); every step, the structures still running are evaluated
together in one batched forward pass of the potential (:class:`BatchEvaluator`:
matgl and CHGNet).  The cell filter's 3x3 matrix functions are computed by
eigendecomposition (:func:`eig_logm`, :func:`eig_expm_frechet`), measured
faster than scipy's general ones for these small symmetric matrices, with a
fallback when the eigenvectors are ill-conditioned.  A relaxation whose result
is not physical (NaN, collapsed atoms, runaway cell) fails with
:class:`RelaxationFailed`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress

from ase_crystal_llm.info_keys import ENERGY_SCALE, POTENTIAL, RELAX_ERROR, RELAX_FAILED

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "BatchEvaluator", "CHGNetBatchEvaluator", "MAX_VOLUME_RATIO", "MIN_DISTANCE", "MatglBatchEvaluator",
    "RelaxationFailed", "SevenNetBatchEvaluator", "batch_evaluator", "eig_expm_frechet", "eig_logm",
    "run_batched",
]


# Structures whose relaxation goes this wrong count as failed ("exploded").
MIN_DISTANCE = 0.5  # A: atoms collapsed onto each other

MAX_VOLUME_RATIO = 8.0  # cell volume grew (or shrank) by more than this factor

class RelaxationFailed(RuntimeError):
    """A structure exploded, collapsed or could not be evaluated."""

def _check_sane(atoms, results, volume0):
    """Raise RelaxationFailed for NaN results, collapsed atoms or a runaway cell."""
    if not (np.isfinite(results["energy"]) and np.isfinite(results["forces"]).all()
            and np.isfinite(results["stress"]).all()):
        raise RelaxationFailed("potential returned NaN or infinite energy/forces/stress")
    volume = abs(atoms.get_volume())
    if not np.isfinite(volume) or volume < volume0 / MAX_VOLUME_RATIO or volume > volume0 * MAX_VOLUME_RATIO:
        raise RelaxationFailed(f"cell volume ran away ({volume0:.3g} -> {volume:.3g} A^3)")
    if len(atoms) > 1:
        from ase.geometry import get_distances

        _, dist = get_distances(atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        dist[np.diag_indices_from(dist)] = np.inf
        if dist.min() < MIN_DISTANCE:
            raise RelaxationFailed(f"atoms collapsed ({dist.min():.3f} A apart)")

def _failed_copy(atoms, error, name, scale):
    failed = atoms.copy() if isinstance(atoms, Atoms) else Atoms()
    failed.calc = None
    failed.info.update({RELAX_FAILED: True, RELAX_ERROR: str(error), POTENTIAL: name, ENERGY_SCALE: scale})
    for key in ("energy", "relax_converged", "relax_steps"):
        failed.info.pop(key, None)
    return failed


class BatchEvaluator:
    """Energies, forces and stresses of many structures per call (one job).

    ``evaluate(atoms_list)`` returns ``[(energy eV, forces (N, 3) eV/A, stress
    voigt eV/A^3), ...]``.  This base class loops over an ASE calculator; the
    subclasses put many structures into one graph.
    """

    batched = False

    def __init__(self, calculator: Calculator) -> None:
        self.calculator = calculator

    def evaluate(self, atoms_list: Sequence[Atoms]) -> list[tuple[float, np.ndarray, np.ndarray]]:
        results = []
        for atoms in atoms_list:
            atoms = atoms.copy()
            atoms.calc = self.calculator
            results.append((atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()))
        return results


class MatglBatchEvaluator(BatchEvaluator):
    """One matgl forward pass over a PyG batch of all structures."""

    batched = True

    def evaluate(self, atoms_list: Sequence[Atoms]) -> list[tuple[float, np.ndarray, np.ndarray]]:
        import torch
        from torch_geometric.data import Batch

        calc = self.calculator
        potential = calc.potential
        converter = getattr(calc, "_atoms2graph", None)
        if converter is None:
            from matgl.ext.ase import Atoms2Graph

            converter = calc._atoms2graph = Atoms2Graph(calc.element_types, calc.cutoff)
        graphs, lattices, states = [], [], []
        for atoms in atoms_list:
            graph, lattice, state = converter.get_graph(atoms)
            graphs.append(graph)
            lattices.append(lattice.reshape(1, 3, 3))
            states.append(np.asarray(state, dtype=float).reshape(-1))
        state = None
        if getattr(potential.model, "include_state", False):
            if calc.state_attr is not None:  # one state for every structure
                state = torch.as_tensor(calc.state_attr).reshape(1, -1).repeat(len(graphs), 1)
            else:
                state = torch.tensor(np.stack(states), dtype=torch.float32)
        energies, forces, stresses, _ = potential(Batch.from_data_list(graphs), torch.cat(lattices), state)[:4]
        energies = energies.detach().reshape(-1).cpu().numpy()
        forces = forces.detach().cpu().numpy()
        stresses = stresses.detach().cpu().numpy().reshape(-1, 3, 3) * units.GPa
        out, start = [], 0
        for i, atoms in enumerate(atoms_list):
            stop = start + len(atoms)
            out.append((float(energies[i]), forces[start:stop], full_3x3_to_voigt_6_stress(stresses[i])))
            start = stop
        return out


class CHGNetBatchEvaluator(BatchEvaluator):
    """CHGNet's own batched graph evaluation (``predict_graph``)."""

    batched = True

    def evaluate(self, atoms_list: Sequence[Atoms]) -> list[tuple[float, np.ndarray, np.ndarray]]:
        from pymatgen.io.ase import AseAtomsAdaptor

        model = self.calculator.model
        graphs = [model.graph_converter(AseAtomsAdaptor.get_structure(a)) for a in atoms_list]
        predictions = model.predict_graph(graphs, task="efs", batch_size=len(graphs))
        if isinstance(predictions, dict):
            predictions = [predictions]
        out = []
        for atoms, pred in zip(atoms_list, predictions):
            energy = float(pred["e"]) * (len(atoms) if model.is_intensive else 1)
            stress = np.asarray(pred["s"]) * units.GPa
            out.append((energy, np.asarray(pred["f"]), full_3x3_to_voigt_6_stress(stress)))
        return out


class SevenNetBatchEvaluator(BatchEvaluator):
    """One SevenNet forward pass over a PyG batch (the model's own batch mode, as sevenn's inference uses)."""

    batched = True

    def evaluate(self, atoms_list: Sequence[Atoms]) -> list[tuple[float, np.ndarray, np.ndarray]]:
        import sevenn._keys as KEY
        from sevenn.atom_graph_data import AtomGraphData
        from sevenn.train.dataload import unlabeled_atoms_to_graph
        from torch_geometric.data import Batch

        calc = self.calculator
        graphs = []
        for atoms in atoms_list:
            graph = AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(atoms, calc.cutoff, with_shift=False))
            if calc.modal:
                graph[KEY.DATA_MODALITY] = calc.modal
            graphs.append(graph)
        calc.model.set_is_batch_data(True)
        try:
            output = calc.model(Batch.from_data_list(graphs).to(calc.device))
        finally:
            calc.model.set_is_batch_data(False)  # the calculator's single-structure mode
        energies = output[KEY.PRED_TOTAL_ENERGY].detach().cpu().numpy().reshape(-1)
        forces = output[KEY.PRED_FORCE].detach().cpu().numpy()
        # sevenn's order is xx yy zz xy yz zx with the opposite sign; ASE's Voigt is xx yy zz yz xz xy
        stresses = -output[KEY.PRED_STRESS].detach().cpu().numpy().reshape(len(atoms_list), 6)[:, [0, 1, 2, 4, 5, 3]]
        out, start = [], 0
        for i, atoms in enumerate(atoms_list):
            stop = start + len(atoms)
            out.append((float(energies[i]), forces[start:stop], stresses[i]))
            start = stop
        return out


def batch_evaluator(calculator: Calculator) -> BatchEvaluator:
    """The best evaluator for a calculator (batched for matgl, CHGNet and SevenNet)."""
    import sys

    matgl_ase = sys.modules.get("matgl.ext.ase")  # imported by whoever built a matgl calculator
    if matgl_ase is not None and isinstance(calculator, matgl_ase.PESCalculator):
        if not (calculator.compute_charge or calculator.compute_magmom or calculator.compute_hessian):
            return MatglBatchEvaluator(calculator)
    chgnet_dynamics = sys.modules.get("chgnet.model.dynamics")
    if chgnet_dynamics is not None and isinstance(calculator, chgnet_dynamics.CHGNetCalculator):
        return CHGNetBatchEvaluator(calculator)
    sevenn_calculator = sys.modules.get("sevenn.calculator")
    if sevenn_calculator is not None and isinstance(calculator, sevenn_calculator.SevenNetCalculator):
        return SevenNetBatchEvaluator(calculator)
    return BatchEvaluator(calculator)


def run_batched(items: Iterable[tuple[str, Atoms, int]], evaluator: BatchEvaluator, *, fmax: float, steps: int,
                batch_size: int, potential: tuple[str, str],
                finished: Callable[[tuple[str, int], Atoms], Any]) -> None:
    """FIRE on many structures in lockstep, one batched evaluation per step.

    Every structure keeps its own ASE ``FIRE`` on ``FrechetCellFilter``; the
    calculator results it reads are filled in by one ``evaluator.evaluate`` over
    all active structures.  Finished structures leave the batch and waiting ones
    take their place, so the batch stays full.

    Parameters
    ----------
    items : iterable of (key, Atoms, index)
    finished : callable(tag, relaxed_atoms) with ``tag = (key, index)``
    """
    pending = iter(items)
    active = []
    exhausted = False
    while True:
        while not exhausted and len(active) < batch_size:
            item = next(pending, None)
            if item is None:
                exhausted = True
                break
            key, atoms, index = item
            job = _RelaxJob(atoms, fmax, steps, tag=(key, index))
            job.attach(_CachedResults())
            active.append(job)
        if not active:
            return
        _evaluate_jobs(active, evaluator)
        for job in active:
            if not job.done:
                try:
                    job.advance()
                except Exception as err:  # noqa: BLE001
                    job.fail(err)
        still = []
        for job in active:
            if job.done:
                finished(job.tag, job.result(*potential))
            else:
                still.append(job)
        active = still


def _evaluate_jobs(jobs, evaluator):
    """One batched evaluation; if it fails, find the culprit one by one."""
    try:
        results = evaluator.evaluate([job.atoms for job in jobs])
    except Exception:  # noqa: BLE001 - isolate the structure that broke the batch
        for job in jobs:
            try:
                job.slot.store(job.atoms, *evaluator.evaluate([job.atoms])[0])
            except Exception as err:  # noqa: BLE001
                job.fail(err)
        return
    for job, result in zip(jobs, results):
        job.slot.store(job.atoms, *result)


class _CachedResults(Calculator):
    """Hands out results computed elsewhere (by a batched evaluation)."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def store(self, atoms, energy, forces, stress):
        self.atoms = atoms.copy()
        self.results = {
            "energy": float(energy),
            "free_energy": float(energy),
            "forces": np.array(forces, dtype=float),
            "stress": np.array(stress, dtype=float),
        }

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        raise RuntimeError("batched relaxation asked for a result that was not evaluated")


class _RelaxJob:
    """One structure's FIRE + FrechetCellFilter state, stepped from outside.

    ``advance`` does what one iteration of ``Optimizer.irun`` does: check
    convergence with the current results, else take one FIRE step.
    """

    def __init__(self, atoms, fmax, steps, tag=None):
        self.initial = atoms
        self.atoms = Atoms(atoms.numbers, cell=atoms.cell, positions=atoms.positions, pbc=atoms.pbc)
        self.fmax, self.max_steps, self.tag = fmax, steps, tag
        self.done = False
        self.converged = False
        self.error = None
        self.volume0 = abs(atoms.get_volume())

    def attach(self, slot):
        from ase.filters import FrechetCellFilter
        from ase.optimize import FIRE

        self.slot = slot
        self.atoms.calc = slot
        self.optimizer = FIRE(_fast_cell_algebra(FrechetCellFilter(self.atoms)), logfile=None)
        self.optimizer.optimizable = _GradientOnce(self.optimizer.optimizable)
        self.optimizer.fmax = self.fmax

    def advance(self):
        _check_sane(self.atoms, self.slot.results, self.volume0)
        opt = self.optimizer
        gradient = opt.optimizable.get_gradient()
        if opt.gradient_converged(gradient):
            self.done, self.converged = True, True
        elif opt.nsteps >= self.max_steps:
            self.done = True
        else:
            opt.step()
            opt.nsteps += 1

    def fail(self, err):
        self.done = True
        self.error = f"{type(err).__name__}: {err}".strip()

    def result(self, name, scale):
        if self.error is not None:
            return _failed_copy(self.initial, self.error, name, scale)
        res = self.slot.results
        relaxed = self.atoms.copy()
        relaxed.info = dict(self.initial.info)
        relaxed.calc = SinglePointCalculator(
            relaxed, energy=res["energy"], free_energy=res["energy"], forces=res["forces"], stress=res["stress"]
        )
        relaxed.info.update(
            energy=res["energy"],
            relax_converged=self.converged,
            relax_steps=int(self.optimizer.nsteps),
            potential=name,
            energy_scale=scale,
        )
        for key in ("relax_failed", "relax_error"):
            relaxed.info.pop(key, None)
        return relaxed


def _fast_cell_algebra(cell_filter):
    """Give a FrechetCellFilter eigen-decomposition ``logm``/``expm_frechet``.

    scipy's general routines cost ~5 ms per 3x3 call, a third of a batched
    relaxation step; the deformation gradients here are near the identity and
    diagonalisable, where the closed forms below agree with scipy to ~1e-13
    (anything ill-conditioned falls back to scipy).  Same filter, same steps.
    """
    utility = getattr(cell_filter, "_utility", None)
    if utility is not None and hasattr(utility, "logm") and hasattr(utility, "expm_frechet"):
        utility.logm = eig_logm
        utility.expm_frechet = eig_expm_frechet
    return cell_filter


_MAX_EIGVEC_COND = 1e6


def _eig(matrix):
    values, vectors = np.linalg.eig(matrix)
    if np.linalg.cond(vectors) > _MAX_EIGVEC_COND:
        return None
    return values, vectors


def eig_logm(matrix: np.ndarray) -> np.ndarray:
    """Matrix logarithm of a diagonalisable real matrix (scipy.linalg.logm fallback)."""
    decomposition = _eig(matrix)
    if decomposition is None or np.any(np.abs(decomposition[0]) < 1e-12) or np.any(
        (decomposition[0].real <= 0) & (np.abs(decomposition[0].imag) < 1e-12)
    ):
        from scipy.linalg import logm

        return logm(matrix)
    values, vectors = decomposition
    log = (vectors * np.log(values.astype(complex))) @ np.linalg.inv(vectors)
    return log.real


def eig_expm_frechet(matrix: np.ndarray, direction: np.ndarray, compute_expm: bool = True,
                     **kwargs: Any) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Frechet derivative of expm at ``matrix`` along ``direction`` (scipy signature)."""
    decomposition = _eig(matrix)
    if decomposition is None or kwargs:
        from scipy.linalg import expm_frechet

        return expm_frechet(matrix, direction, compute_expm=compute_expm, **kwargs)
    values, vectors = decomposition
    inverse = np.linalg.inv(vectors)
    # divided differences of exp: (e^a - e^b) / (a - b), e^a on the diagonal
    diff = values[:, None] - values[None, :]
    small = np.abs(diff) < 1e-10
    safe = np.where(small, 1.0, diff)
    ratio = np.where(small, 1.0 + diff / 2, np.expm1(safe) / safe)
    phi = np.exp(values)[None, :] * ratio
    derivative = (vectors @ ((inverse @ direction @ vectors) * phi) @ inverse).real
    if compute_expm:
        return (vectors * np.exp(values)) @ inverse, derivative
    return derivative


class _GradientOnce:
    """An ASE optimizable that computes its gradient once per position.

    ``Optimizer.irun`` and ``FIRE.step`` each ask for the gradient; with
    FrechetCellFilter every request costs matrix exponentials.
    """

    def __init__(self, inner):
        self._inner = inner
        self._gradient = None

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def get_gradient(self):
        if self._gradient is None:
            self._gradient = self._inner.get_gradient()
        return self._gradient.copy()

    def set_x(self, x):
        self._gradient = None
        self._inner.set_x(x)


@contextlib.contextmanager
def _small_matrix_threads():
    """One BLAS thread: the filter's 3x3/9x9 algebra is 10x slower when threaded on busy cores."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield
