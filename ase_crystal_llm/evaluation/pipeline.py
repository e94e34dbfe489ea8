"""The evaluation pipeline behind ``crystal-llm evaluate``.

:func:`evaluate` reads generated structures, computes the sample metrics of
:mod:`.metrics` against the MP-20 splits (coverage and distributions against
the test split, novelty against the training and validation splits), relaxes the valid samples
with an ML potential (:func:`~.relaxation.relax_many`, cached in
``<out_dir>/relax_cache.db`` so an interrupted run resumes), takes their
energy above the MP-20 hull (:class:`~.hull.ReferenceHull`) and writes
``metrics.json``, ``report.md`` (:mod:`.report`), ``samples.csv``,
``relaxed.extxyz`` and plots.

By default coverage uses a seeded subsample of :data:`~.options.COVERAGE_SIZE`
test crystals; the report says so, since the paper's protocol uses the full split.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ase_crystal_llm import settings
from ase_crystal_llm.chemistry.validity import as_atoms, structure_valid, validity_flags, validity_rates
from ase_crystal_llm.evaluation.distribution import CrystalStatistics, distribution_summary, split_statistics
from ase_crystal_llm.evaluation.hull import ReferenceHull
from ase_crystal_llm.evaluation.metrics import (
    COMP_CUTOFF,
    METASTABLE,
    STRUCT_CUTOFF,
    CompositionScaler,
    Fingerprints,
    NoveltyIndex,
    conditional_accuracy,
    coverage,
    diversity,
    emitted_validity,
    stability_rates,
    unique_flags,
    wasserstein,
)
from ase_crystal_llm.evaluation.options import COVERAGE_SIZE, IPT_SIZE, EvaluationOptions
from ase_crystal_llm.evaluation.potentials import ENERGY_SCALES, get_calculator, potential_info
from ase_crystal_llm.evaluation.references import _reference
from ase_crystal_llm.evaluation.relaxation import relax_many
from ase_crystal_llm.evaluation.report import _plots, report_markdown
from ase_crystal_llm.info_keys import E_ABOVE_HULL, ENERGY, POTENTIAL, RELAX_CONVERGED, RELAX_ERROR, RELAX_FAILED
from ase_crystal_llm.io.files import atomic_write, json_default
from ase_crystal_llm.model.scoring import ipt
from ase_crystal_llm.options import document_options
from ase_crystal_llm.text.format import is_periodic

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    import torch
    from ase import Atoms
    from ase.calculators.calculator import Calculator
    from pymatgen.core import Structure
    from transformers import PreTrainedTokenizerBase

    from ase_crystal_llm.text.prompts import PromptTemplate

__all__ = [
    "E_HULL_FLOOR", "IPT_SIZE", "REFERENCES", "SAMPLE_COLUMNS", "check_structures", "e_above_hull_many",
    "evaluate", "model_ipt", "read_samples", "run_stats",
]


REFERENCES = ("mp20",)


def read_samples(source: str | os.PathLike, limit: int | None = None) -> list[Atoms]:
    """Structures to evaluate; refuses empty sources and non-periodic structures."""
    from ase_crystal_llm.data.datasets import read_structures

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return check_structures(read_structures(source, canonical=False, limit=limit), source)


def check_structures(structures: Sequence[Atoms], source: str | os.PathLike = "input") -> Sequence[Atoms]:
    """Refuse an empty list and structures that are not 3D-periodic crystals."""
    if not structures:
        raise ValueError(f"no structures in {source}")
    for i, atoms in enumerate(structures):
        if len(atoms) == 0:
            raise ValueError(f"{source}: structure {i} has no atoms")
        if not is_periodic(atoms):
            raise ValueError(f"{source}: structure {i} ({atoms.get_chemical_formula()}) is not periodic in 3D; "
                             "evaluation needs crystals with a full cell and pbc=True")
    return structures


def run_stats(source: str | os.PathLike, n: int, limit: int | None = None) -> dict[str, Any] | None:
    """Summed generation statistics of the run records beside ``source``.

    None unless the records describe exactly its ``n`` samples.
    """
    if limit is not None or "://" in str(source) or not Path(source).is_file():
        return None
    try:
        from ase_crystal_llm.io.outputs import read_run_records

        runs = read_run_records(source)
    except (ImportError, OSError, ValueError):
        return None
    stats = [r.get("stats") or {} for r in runs]
    if not stats or sum(int(s.get("returned") or 0) for s in stats) != n:
        return None  # the file was edited, filtered or appended to by other means
    total = {"attempts": 0, "returned": 0, "gave_up": 0, "parse_failures": {}}
    for s in stats:
        for key in ("attempts", "returned", "gave_up"):
            total[key] += int(s.get(key) or 0)
        for reason, count in (s.get("parse_failures") or {}).items():
            total["parse_failures"][reason] = total["parse_failures"].get(reason, 0) + int(count)
    return total


def _load_language_model(path):
    """Model, tokenizer and prompt template of a model directory, for IPT."""
    try:
        from ase_crystal_llm.generation.generator import CrystalGenerator
    except ImportError:  # generation module not available: plain transformers load
        CrystalGenerator = None
    if CrystalGenerator is not None:
        gen = CrystalGenerator.from_pretrained(path)  # its default device: cuda when available
        return gen.model, gen.tokenizer, gen.template
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ase_crystal_llm.model.modelcard import ModelCard

    card = ModelCard.from_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), card.template


def model_ipt(model: str | os.PathLike | tuple[torch.nn.Module, PreTrainedTokenizerBase, PromptTemplate],
              crystals: str | os.PathLike | Sequence[Atoms], *, size: int = IPT_SIZE, seed: int = 0,
              progress: bool = False) -> dict[str, Any]:
    """IPT of a model on the first ``size`` crystals of a split (canonical cells, as in training).

    ``model`` is a model directory or a ``(model, tokenizer, template)`` triple.
    """
    from ase_crystal_llm.data.datasets import read_structures

    if size < 1:
        raise ValueError(f"IPT needs at least one crystal, got size {size}")
    lm, tokenizer, template = model if isinstance(model, tuple) else _load_language_model(model)
    structures = read_structures(crystals, limit=size)
    return ipt(lm, tokenizer, template, structures, seed=seed, progress=progress)


# -- the pipeline -------------------------------------------------------------------
def _check_potential(potential):
    """Load the potential once: unknown names, unloadable weights and off-scale energies fail here."""

    name, scale = potential_info(get_calculator(potential))
    if scale not in ENERGY_SCALES:
        raise ValueError(f"potential {name} predicts energies on the {scale!r} scale, which cannot be compared "
                         f"with the Materials Project hull: use m3gnet or chgnet")


# Far below any real crystal against a hull of known stable phases (real samples reach about -0.2
# eV/atom); SevenNet relaxes some samples into holes at -2 to -23,000 eV/atom (docs/stability.md).
E_HULL_FLOOR = -1.0  # eV/atom


def e_above_hull_many(relaxed: Sequence[Atoms], hull: ReferenceHull, *,
                      exclude: Sequence[Any] | None = None) -> tuple[list[float | None], list[str | None]]:
    """Energy above hull of each relaxed structure, failures kept as reasons.

    Parameters
    ----------
    relaxed : list of ase.Atoms
        Output of :func:`calculators.relax_many` (failed relaxations included).
    hull : hull.ReferenceHull
    exclude : list, optional
        One entry per structure, passed to :meth:`hull.ReferenceHull.e_above_hull`
        (e.g. a structure's own ``material_id`` to judge it with itself left out; ``None``: keep all).

    Returns
    -------
    (values, errors) : two lists
        E_hull in eV/atom, or ``None`` with a one-line reason in ``errors`` (a failed
        relaxation, a hull error, or a value below :data:`E_HULL_FLOOR`).
    """
    if exclude is not None and len(exclude) != len(relaxed):
        raise ValueError(f"exclude has {len(exclude)} entries for {len(relaxed)} structures")
    values, errors = [], []
    for i, atoms in enumerate(relaxed):
        if atoms.info.get(RELAX_FAILED):
            values.append(None)
            errors.append(f"relaxation failed: {atoms.info.get(RELAX_ERROR, 'unknown')}")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # pymatgen's per-entry oxidation-state guesses
                value = float(hull.e_above_hull(atoms, exclude=None if exclude is None else exclude[i]))
            if not math.isfinite(value):
                raise ValueError("non-finite energy above hull")
            if value < E_HULL_FLOOR:
                raise ValueError(f"E_hull {value:.3g} eV/atom is below {E_HULL_FLOOR}: "
                                 "the potential relaxed into an unphysical minimum")
            values.append(value)
            errors.append(None)
        except Exception as err:  # counted as a failure and reported, never dropped silently
            values.append(None)
            errors.append(f"hull: {' '.join(str(err).split()) or type(err).__name__}")
    return values, errors


@document_options(EvaluationOptions)
def evaluate(samples: str | os.PathLike | Iterable[Atoms | Structure], out_dir: str | os.PathLike, *,
             reference: str = "mp20", data_dir: str | os.PathLike | None = None,
             potential: str | os.PathLike | Calculator = "m3gnet", fmax: float = 0.1, steps: int = 500,
             rattle: float | None = None, workers: int | None = None, model: str | os.PathLike | None = None,
             limit: int | None = None,
             coverage_size: int | str | None = None, coverage_relaxed: bool = False, ipt_size: int = IPT_SIZE,
             seed: int = 0,
             cache: str | os.PathLike | None = None, progress: bool = True, plots: bool = True,
             threads: int | None = None, table_db: bool = False) -> dict[str, Any]:
    """Evaluate generated crystals and write a report.

    Parameters
    ----------
    samples : str, path or list of ase.Atoms
        Any ase.io file, ``.db`` or CSV (read with
        :func:`datasets.read_structures`), or structures.
    out_dir : path
        Report folder: ``metrics.json``, ``report.md``, ``samples.csv``,
        ``relaxed.extxyz``, ``*.png`` and ``relax_cache.db``.
    {options}

    Returns
    -------
    dict
        What is written to ``metrics.json``.
    """

    if reference not in REFERENCES:
        raise ValueError(f"unknown reference {reference!r}: use {', '.join(REFERENCES)}")
    if model is not None and ipt_size < 1:
        raise ValueError(f"IPT needs at least one crystal, got ipt_size {ipt_size}")
    ref_size = _coverage_size(coverage_size)
    out_dir = Path(out_dir)
    timer = _Timer()
    with timer("load"):
        source, structures = _read_input(samples, limit)
        test_path, train_path = settings.mp20_path("test", data_dir), settings.mp20_path("train", data_dir)
        if any(structure_valid(a) for a in structures):
            _check_potential(potential)  # before the slow steps
        language_model = _load_language_model(model) if model is not None else None  # bad weights fail here
        out_dir.mkdir(parents=True, exist_ok=True)
    n = len(structures)
    result = {"samples": {"source": source, "n": n},
              "settings": _run_settings(reference, potential, fmax, steps, seed, rattle)}
    with timer("validity"):
        flags, valid_idx, result["validity"] = _validity(structures, source, limit)
        valid = [structures[i] for i in valid_idx]
        result["samples"]["n_valid"] = len(valid)
    with timer("reference_fingerprints"):
        ref, ref_info = _reference(test_path, size=ref_size, seed=seed, cache=cache, workers=workers,
                                   progress=progress, label="MP-20 test")
        result["settings"]["coverage_reference_size"] = ref_info["size"]
    with timer("coverage"):
        fps = Fingerprints.from_structures(valid, workers=workers, progress=progress,
                                                   desc="sample fingerprints")
        result.update(_distribution_metrics(fps, ref, n))
        result["coverage"]["reference"] = {"split": "MP-20 test", **ref_info}
    with timer("distribution"):
        result["distribution"] = _distribution(valid, test_path, settings.mp20_path("val", data_dir), ref_size, seed,
                                               ref_info["split_size"])
    with timer("novelty"):
        known = [train_path, settings.mp20_path("val", data_dir)]  # novel: in neither split the model could see
        unique, novel = _spread(valid_idx, n, *_uniqueness_novelty(valid, known, progress))
        result["settings"]["novelty_reference"] = "MP-20 train+val (pymatgen StructureMatcher)"
        result.update(_novelty_rates(unique, novel, valid_idx))
    with timer("relaxation"):
        starts = [_rattled(a, rattle, (seed, i)) for a, i in zip(valid, valid_idx)] if rattle else valid
        relaxed, computed = _relax_valid(starts, potential, out_dir / "relax_cache.db", fmax=fmax, steps=steps,
                                         workers=workers, progress=progress, threads=threads)
    with timer("hull"):
        ref_hull = ReferenceHull.from_mp20(data_dir) if relaxed else None
        e_hull, errors, e_form = _hull_energies(relaxed, valid_idx, n, ref_hull)
        result["relaxation"] = _relaxation_summary(relaxed, computed)
        result["stability"] = _stability_summary(e_hull, errors, unique, novel, result["validity"]["emitted"])
    if coverage_relaxed:
        with timer("coverage_relaxed"):
            result["coverage_relaxed"] = _relaxed_coverage(relaxed, ref, n, workers, progress)
    result["conditional"] = conditional_accuracy(structures)
    result["ipt"] = None
    if model is not None:
        with timer("ipt"):
            result["ipt"] = model_ipt(language_model, test_path, size=ipt_size, seed=seed, progress=progress)
            result["ipt"]["model"] = str(model)
    result["timings_s"] = timer.rounded()

    result["settings"]["hull"] = ref_hull.name if relaxed else None
    per_structure = _per_structure(structures, flags, unique, novel, dict(zip(valid_idx, relaxed)), e_form, e_hull,
                                   errors, result["settings"]["hull"])
    _write_samples_csv(out_dir / "samples.csv", per_structure)
    if table_db:
        _write_samples_db(out_dir / "samples.db", structures, dict(zip(valid_idx, relaxed)), per_structure)
    _write_relaxed(out_dir / "relaxed.extxyz", relaxed)
    atomic_write(out_dir / "metrics.json", json.dumps(result, indent=2, default=json_default) + "\n")
    figures = _plots(out_dir, result, e_hull, fps, ref) if plots else []
    atomic_write(out_dir / "report.md", report_markdown(result, figures))  # a killed run leaves no half report
    return result


# -- the stages of evaluate --------------------------------------------------------
def _read_input(samples, limit):
    """The name of the samples' source and their checked structures (from a file or given)."""
    if isinstance(samples, (str, os.PathLike)):
        return str(samples), read_samples(samples, limit)
    return "<structures>", check_structures([as_atoms(a) for a in samples][:limit], "the structures given")


def _run_settings(reference, potential, fmax, steps, seed, rattle):
    """The ``settings`` of ``metrics.json``; later stages fill in the reference size and add the references used."""
    potential_name = potential if isinstance(potential, str) else type(potential).__name__
    return {"reference": reference, "potential": potential_name, "fmax": fmax, "steps": steps, "rattle": rattle,
            "coverage_reference_size": None, "seed": seed, "struct_cutoff": STRUCT_CUTOFF,
            "comp_cutoff": COMP_CUTOFF, "metastable_threshold": METASTABLE}


def _validity(structures, source, limit):
    """Validity flags, the indices of the valid samples, and the rates over returned and emitted samples."""
    flags = validity_flags(structures)
    valid_idx = [i for i, ok in enumerate(flags["valid"]) if ok]
    rates = {"returned": validity_rates(flags),
             "emitted": emitted_validity(structures, flags, run_stats(source, len(structures), limit))}
    return flags, valid_idx, rates


def _distribution(valid, test_path, val_path, ref_size, seed, test_rows):
    """Distribution distances of the valid samples, and of as many real val crystals, to the coverage reference."""
    reference = split_statistics(test_path, ref_size, seed, n_rows=test_rows)
    real = split_statistics(val_path, max(len(valid), 1), seed)
    summary = distribution_summary(CrystalStatistics.from_structures(valid), reference, real)
    summary["settings"] = {"reference": "MP-20 test (the coverage reference rows)", "real": "MP-20 val, seeded",
                           "symprec": 0.1, "cell": "primitive Niggli (samples as generated)"}
    return summary


def _novelty_rates(unique, novel, valid_idx):
    """Uniqueness, novelty and both, as rates over the valid samples."""
    return {
        "uniqueness": _rate([unique[i] for i in valid_idx]),
        "novelty": _rate([novel[i] for i in valid_idx]),
        "unique_and_novel": _rate([unique[i] and novel[i] for i in valid_idx]),
    }


def _rattled(atoms, stdev, seed):
    """A copy of ``atoms`` with every atom moved by a seeded Gaussian of ``stdev`` angstrom per axis."""
    copy = atoms.copy()
    copy.positions += np.random.default_rng(seed).normal(0.0, stdev, copy.positions.shape)
    return copy


def _relax_valid(valid, potential, cache_path, *, fmax, steps, workers, progress, threads):
    """The relaxed valid samples, and how many of them were computed (the others come from the cache)."""
    before = _cache_rows(cache_path)
    relaxed = relax_many(valid, potential, fmax=fmax, steps=steps, workers=workers,
                         cache=cache_path, progress=progress, threads=threads) if valid else []
    return relaxed, _cache_rows(cache_path) - before


def _hull_energies(relaxed, valid_idx, n, ref_hull):
    """E_hull, failure reason and formation energy of every sample; the relaxed structures get theirs in ``info``."""
    e_valid, err_valid = e_above_hull_many(relaxed, ref_hull)
    e_hull, errors = _spread(valid_idx, n, e_valid, err_valid, fill=(None, "invalid sample"))
    (e_form,) = _spread(valid_idx, n, [_formation_energy(a, ref_hull) for a in relaxed], fill=(None,))
    for atoms, i in zip(relaxed, valid_idx):
        atoms.info["input_index"] = i
        if e_hull[i] is not None:
            atoms.info[E_ABOVE_HULL] = e_hull[i]
    return e_hull, errors, e_form


def _stability_summary(e_hull, errors, unique, novel, emitted_rates):
    """Stability rates, failures and median E_hull; also per model output when the run records count them."""
    stability = {**stability_rates(e_hull, unique=unique, novel=novel),
                 "failures": _count_reasons(errors),
                 "e_hull_median": _median([e for e in e_hull if e is not None])}
    emitted = (emitted_rates or {}).get("all")
    if emitted and stability["n"]:
        # Re-sampled attempts (unparsed, too-close atoms) count too: rates per model output.
        scale = stability["n"] / emitted["emitted"]
        stability["over_emitted"] = {
            "emitted": emitted["emitted"],
            **{key: stability[key] * scale for key in ("metastable", "stable", "sun", "msun")},
        }
    return stability


def _coverage_size(value):
    """Reference subsample size for :func:`evaluate`: None -> :data:`COVERAGE_SIZE`; ``"all"`` or 0 -> None (all)."""
    if value is None:
        return COVERAGE_SIZE
    if isinstance(value, str) and value.strip().lower() == "all":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"coverage_size must be a whole number >= 0 or 'all', got {value!r}")
    return int(value) or None


class _Timer:
    """Wall time of named stages: ``with timer("name"): ...``."""

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, name):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def rounded(self):
        return {k: round(v, 2) for k, v in self.seconds.items()}


def _spread(indices, n, *columns, fill=None):
    """Per-valid-sample columns laid out over all ``n`` samples (``fill`` elsewhere, default False)."""
    fill = fill if fill is not None else (False,) * len(columns)
    out = []
    for column, default in zip(columns, fill):
        full = [default] * n
        for value, i in zip(column, indices):
            full[i] = value
        out.append(full)
    return out


def _coverage_against(fps, ref, n, scaler=None):
    return {**coverage(fps, ref, n_total=n, scaler=scaler), "reference_size": len(ref)}


def _distribution_metrics(fps, ref, n):
    scaler = CompositionScaler.fit(ref.composition[ref.ok])
    return {
        "coverage": _coverage_against(fps, ref, n, scaler),
        "wasserstein": wasserstein(fps, ref),
        "diversity": diversity(fps, scaler),
    }


def _relaxed_coverage(relaxed, ref, n, workers, progress):
    """Coverage of the relaxed valid samples, precision over all ``n`` samples (failed relaxations: not covered)."""
    done = [a for a in relaxed if not a.info.get(RELAX_FAILED)]
    fps = Fingerprints.from_structures(done, workers=workers, progress=progress, desc="relaxed fingerprints")
    return {**_coverage_against(fps, ref, n), "relaxed": len(done)}  # coverage fits the as-written scaler


def _uniqueness_novelty(valid, known_paths, progress):
    unique = unique_flags(valid)
    index = NoveltyIndex.from_csv(known_paths)
    novel = [index.is_novel(s) for s in _bar(valid, progress, "novelty")]
    return unique, novel


def _relaxation_summary(relaxed, computed):
    return {
        "attempted": len(relaxed),
        "failed": sum(bool(a.info.get(RELAX_FAILED)) for a in relaxed),
        "not_converged": sum(a.info.get(RELAX_CONVERGED) is False for a in relaxed),
        "computed": computed,
        "from_cache": len(relaxed) - computed,
    }


def _median(values):
    return float(np.median(values)) if values else None


def _bar(items, progress, desc):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not progress, leave=False)


def _rate(flags):
    return float(np.mean(flags)) if len(flags) else None


def _cache_rows(path):
    if not Path(path).is_file():
        return 0
    import ase.db

    with ase.db.connect(str(path)) as db:
        return db.count()


def _count_reasons(errors):
    counts = {}
    for err in errors:
        if err is not None:
            key = err.split(":")[0]
            counts[key] = counts.get(key, 0) + 1
    return counts


def _formation_energy(relaxed, hull):
    if relaxed.info.get(RELAX_FAILED):
        return None
    try:
        return hull.formation_energy(relaxed)
    except (ValueError, KeyError):  # no reference for an element, an energy scale the hull cannot use
        return None


SAMPLE_COLUMNS = ("index", "formula", "structure_valid", "composition_valid", "unique", "novel", "potential",
                  "energy_per_atom", "formation_energy_per_atom", "e_above_hull", "stable", "metastable", "hull",
                  "failure")


def _per_structure(structures, flags, unique, novel, relaxed, e_form, e_hull, errors, hull):
    """One row per sample (``samples.csv``): validity, uniqueness, novelty, relaxed energies, thresholds met."""
    rows = []
    for i, atoms in enumerate(structures):
        done = relaxed.get(i)
        energy = done.info.get(ENERGY) if done is not None else None
        e = e_hull[i]
        rows.append({
            "index": i, "formula": atoms.get_chemical_formula(), "structure_valid": flags["structure"][i],
            "composition_valid": flags["composition"][i], "unique": unique[i], "novel": novel[i],
            "potential": done.info.get(POTENTIAL, "") if done is not None else "",
            "energy_per_atom": "" if energy is None else f"{energy / len(done):.6f}",
            "formation_energy_per_atom": "" if e_form[i] is None else f"{e_form[i]:.6f}",
            "e_above_hull": "" if e is None else f"{e:.6f}",
            "stable": e is not None and e <= 0.0, "metastable": e is not None and e < METASTABLE,
            "hull": hull or "", "failure": errors[i] or "",
        })  # fmt: skip
    return rows


def _write_samples_csv(path, rows):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=SAMPLE_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue())


def _write_samples_db(path, structures, relaxed, rows):
    """``samples.csv`` as an ase.db (``ase db samples.db metastable=True``), written whole or not at all."""
    from ase_crystal_llm.io.outputs import StructureWriter

    numeric = ("energy_per_atom", "formation_energy_per_atom", "e_above_hull")
    # SQLite writes by path (each row committed), so not atomic_write: a hidden file, then rename.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.db")
    with StructureWriter(tmp) as writer:
        for i, row in enumerate(rows):
            done = relaxed.get(i)
            use_relaxed = done is not None and not done.info.get(RELAX_FAILED)
            atoms = (done if use_relaxed else structures[i]).copy()
            atoms.calc = done.calc if use_relaxed else None  # row.energy of the relaxed structure
            # ase.db reserves "index" and "formula" (the row has its own formula): renamed
            names = {"index": "sample_index", "formula": "sample_formula"}
            atoms.info = {names.get(k, k): float(v) if k in numeric else v for k, v in row.items() if v != ""}
            writer.write(atoms)
    os.replace(tmp, path)


def _write_relaxed(path, relaxed):
    import ase.io

    if not relaxed:
        return
    out = []
    for atoms in relaxed:
        atoms = atoms.copy()
        atoms.calc = None  # energies already live in info
        out.append(atoms)
    text = io.StringIO()
    ase.io.write(text, out, format="extxyz")
    atomic_write(path, text.getvalue())
