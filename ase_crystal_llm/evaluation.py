"""The evaluation pipeline behind ``crystal-llm evaluate``.

:func:`evaluate` reads generated structures, computes the sample metrics of
:mod:`ase_crystal_llm.metrics` against the MP-20 splits (coverage and
distributions against the test split, novelty against the training split),
relaxes the valid samples with an ML potential (:func:`calculators.relax_many`,
cached in ``<out_dir>/relax_cache.db`` so an interrupted run resumes), takes
their energy above the MP-20 hull (:class:`hull.ReferenceHull`) and writes
``metrics.json``, ``report.md``, ``samples.csv``, ``relaxed.extxyz`` and plots.

The reference fingerprints of the test split (CrystalNN is slow: about 0.1 s
per crystal) are cached in a user cache folder (``$CRYSTAL_LLM_CACHE``, else
``$XDG_CACHE_HOME/ase-crystal-llm``, else ``~/.cache/ase-crystal-llm``), keyed
by the split file's sha256, the subsample size and seed.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np

from . import metrics, settings
from .modelcard import sha256_file

REFERENCES = ("mp20",)
FINGERPRINT_VERSION = 1  # bump when the fingerprint definition changes
IPT_SIZE = 100


# -- caches and reference data ----------------------------------------------------
def cache_dir(path=None):
    """Folder for cached reference fingerprints (created if missing)."""
    path = settings.cache_dir(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_csv_structures(path, size=None, seed=0):
    """Structures of a CDVAE-style CSV, or a seeded random subsample of ``size`` rows (file order kept)."""
    from pymatgen.core import Structure

    csv.field_size_limit(1 << 30)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="") as handle:
        cifs = [row["cif"] for row in csv.DictReader(handle)]
    if size is not None and size < len(cifs):
        keep = np.sort(np.random.default_rng(seed).choice(len(cifs), size=size, replace=False))
        cifs = [cifs[i] for i in keep]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [Structure.from_str(cif, fmt="cif") for cif in cifs]


def reference_fingerprints(path, *, size=None, seed=0, cache=None, workers=None, progress=True):
    """Fingerprints of a reference split, computed once and cached.

    Parameters
    ----------
    path : path
        A CDVAE-style CSV (``cif`` column), e.g. MP-20 ``test.csv.gz``.
    size : int, optional
        Use a seeded random subsample of this many crystals (default: all).
    cache : path, optional
        Cache folder (default :func:`cache_dir`).
    """
    if size is not None and size < 1:
        raise ValueError(f"reference subsample size must be >= 1, got {size}")
    key = f"{sha256_file(path)[:16]}-{size or 'all'}-{seed}-v{FINGERPRINT_VERSION}"
    target = cache_dir(cache) / f"fingerprints-{key}.npz"
    if target.is_file():
        try:
            return metrics.Fingerprints.load(target)
        except (OSError, ValueError, KeyError):
            target.unlink()  # a damaged cache file is recomputed
    structures = _read_csv_structures(path, size, seed)
    fps = metrics.Fingerprints.from_structures(structures, workers=workers, progress=progress,
                                               desc=f"fingerprints of {Path(path).name}")
    tmp = target.with_name(target.stem + f".{os.getpid()}.tmp.npz")
    fps.save(tmp)
    os.replace(tmp, target)  # atomic: a concurrent or interrupted run never sees half a file
    return fps


def read_samples(source, limit=None):
    """Structures to evaluate; refuses empty sources and non-periodic structures."""
    from .datasets import read_structures

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return check_structures(read_structures(source, canonical=False, limit=limit), source)


def check_structures(structures, source="input"):
    """Refuse an empty list and structures that are not 3D-periodic crystals."""
    if not structures:
        raise ValueError(f"no structures in {source}")
    for i, atoms in enumerate(structures):
        if len(atoms) == 0:
            raise ValueError(f"{source}: structure {i} has no atoms")
        if not atoms.pbc.all() or atoms.cell.rank < 3:
            raise ValueError(f"{source}: structure {i} ({atoms.get_chemical_formula()}) is not periodic in 3D; "
                             "evaluation needs crystals with a full cell and pbc=True")
    return structures


def run_stats(source, n, limit=None):
    """Summed generation statistics of the run records beside ``source``, when they describe exactly its ``n`` samples."""
    if limit is not None or "://" in str(source) or not Path(source).is_file():
        return None
    try:
        from .outputs import read_run_records

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
        from .generation import CrystalGenerator
    except ImportError:  # generation module not available: plain transformers load
        CrystalGenerator = None
    if CrystalGenerator is not None:
        gen = CrystalGenerator.from_pretrained(path)  # its default device: cuda when available
        return gen.model, gen.tokenizer, gen.template
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .modelcard import ModelCard

    card = ModelCard.from_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), card.template


def model_ipt(model, crystals, *, size=IPT_SIZE, seed=0, progress=False):
    """IPT of a model on the first ``size`` crystals of a split (canonical cells, as in training).

    ``model`` is a model directory or a ``(model, tokenizer, template)`` triple.
    """
    from .datasets import read_structures

    if size < 1:
        raise ValueError(f"IPT needs at least one crystal, got size {size}")
    lm, tokenizer, template = model if isinstance(model, tuple) else _load_language_model(model)
    structures = read_structures(crystals, limit=size)
    return metrics.ipt(lm, tokenizer, template, structures, seed=seed, progress=progress)


# -- the pipeline -------------------------------------------------------------------
def _check_potential(potential):
    """Load the potential once: unknown names, unloadable weights and off-scale energies fail here."""
    from . import calculators

    name, scale = calculators.potential_info(calculators.get_calculator(potential))
    if scale not in calculators.ENERGY_SCALES:
        raise ValueError(f"potential {name} predicts energies on the {scale!r} scale, which cannot be compared "
                         f"with the Materials Project hull: use m3gnet or chgnet")


def e_above_hull_many(relaxed, hull, *, exclude=None):
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
        E_hull in eV/atom, or ``None`` with a one-line reason in ``errors``.
    """
    if exclude is not None and len(exclude) != len(relaxed):
        raise ValueError(f"exclude has {len(exclude)} entries for {len(relaxed)} structures")
    values, errors = [], []
    for i, atoms in enumerate(relaxed):
        if atoms.info.get("relax_failed"):
            values.append(None)
            errors.append(f"relaxation failed: {atoms.info.get('relax_error', 'unknown')}")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # pymatgen's per-entry oxidation-state guesses
                value = float(hull.e_above_hull(atoms, exclude=None if exclude is None else exclude[i]))
            if not math.isfinite(value):
                raise ValueError("non-finite energy above hull")
            values.append(value)
            errors.append(None)
        except Exception as err:  # counted as a failure and reported, never dropped silently
            values.append(None)
            errors.append(f"hull: {' '.join(str(err).split()) or type(err).__name__}")
    return values, errors


def evaluate(samples, out_dir, *, reference="mp20", data_dir=None, potential="m3gnet", fmax=0.1, steps=500,
             workers=None, model=None, limit=None, coverage_size=None, ipt_size=IPT_SIZE, seed=0,
             cache=None, progress=True, plots=True, threads=None):
    """Evaluate generated crystals and write a report.

    Parameters
    ----------
    samples : str, path or list of ase.Atoms
        Any ase.io file, ``.db`` or CSV (read with
        :func:`datasets.read_structures`), or structures.
    out_dir : path
        Report folder: ``metrics.json``, ``report.md``, ``samples.csv``,
        ``relaxed.extxyz``, ``*.png`` and ``relax_cache.db``.
    reference : str
        ``"mp20"``: coverage and distributions against the test split, novelty
        against the training split, hull from all of MP-20.
    data_dir : path, optional
        Folder holding ``mp_20/`` and ``hull/`` (default: :func:`settings.data_dir`).
    potential, fmax, steps, workers, threads
        Relaxation settings, passed to :func:`calculators.relax_many`.
    model : path, optional
        A model directory: also compute IPT on ``ipt_size`` test crystals.
    limit : int, optional
        Evaluate only the first ``limit`` samples.
    coverage_size : int, optional
        Subsample the test split to this many crystals for coverage and the
        Wasserstein distances (default: all 9,046; cached after the first run).
    seed : int
        Seed of the reference subsample and of IPT's translations.
    cache : path, optional
        Folder for cached reference fingerprints (default :func:`cache_dir`).

    Returns
    -------
    dict
        What is written to ``metrics.json``.
    """
    from . import calculators, hull as hull_module

    if reference not in REFERENCES:
        raise ValueError(f"unknown reference {reference!r}: use {', '.join(REFERENCES)}")
    if model is not None and ipt_size < 1:
        raise ValueError(f"IPT needs at least one crystal, got ipt_size {ipt_size}")
    out_dir = Path(out_dir)
    timer = _Timer()
    with timer("load"):
        if isinstance(samples, (str, os.PathLike)):
            source = str(samples)
            structures = read_samples(samples, limit)
        else:
            source = "<structures>"
            structures = check_structures([metrics.as_atoms(a) for a in samples][:limit], "the structures given")
        test_path, train_path = settings.mp20_path("test", data_dir), settings.mp20_path("train", data_dir)
        if any(metrics.structure_valid(a) for a in structures):
            _check_potential(potential)  # before the slow steps
        language_model = _load_language_model(model) if model is not None else None  # bad weights fail here
        out_dir.mkdir(parents=True, exist_ok=True)
    n = len(structures)
    result = {
        "samples": {"source": source, "n": n},
        "settings": {"reference": reference, "potential": potential if isinstance(potential, str) else
                     type(potential).__name__, "fmax": fmax, "steps": steps,
                     "coverage_reference_size": coverage_size, "seed": seed,
                     "struct_cutoff": metrics.STRUCT_CUTOFF, "comp_cutoff": metrics.COMP_CUTOFF,
                     "metastable_threshold": metrics.METASTABLE},
    }
    with timer("validity"):
        flags = metrics.validity_flags(structures)
        valid_idx = [i for i, ok in enumerate(flags["valid"]) if ok]
        valid = [structures[i] for i in valid_idx]
        result["samples"]["n_valid"] = len(valid)
        result["validity"] = {"returned": metrics.validity_rates(flags),
                              "emitted": metrics.emitted_validity(structures, flags, run_stats(source, n, limit))}
    with timer("coverage"):
        ref = reference_fingerprints(test_path, size=coverage_size, seed=seed, cache=cache, workers=workers,
                                     progress=progress)
        fps = metrics.Fingerprints.from_structures(valid, workers=workers, progress=progress,
                                                   desc="sample fingerprints")
        result.update(_distribution_metrics(fps, ref, n))
    with timer("novelty"):
        unique, novel = _spread(valid_idx, n, *_uniqueness_novelty(valid, train_path, progress))
        result["uniqueness"] = _rate([unique[i] for i in valid_idx])
        result["novelty"] = _rate([novel[i] for i in valid_idx])
        result["unique_and_novel"] = _rate([unique[i] and novel[i] for i in valid_idx])
    with timer("relaxation"):
        cache_path = out_dir / "relax_cache.db"
        before = _cache_rows(cache_path)
        relaxed = calculators.relax_many(valid, potential, fmax=fmax, steps=steps, workers=workers,
                                         cache=cache_path, progress=progress, threads=threads) if valid else []
        computed = _cache_rows(cache_path) - before
    with timer("hull"):
        ref_hull = hull_module.ReferenceHull.from_mp20(data_dir) if relaxed else None
        e_valid, err_valid = e_above_hull_many(relaxed, ref_hull)
        e_hull, errors = _spread(valid_idx, n, e_valid, err_valid, fill=(None, "invalid sample"))
        for atoms, i in zip(relaxed, valid_idx):
            atoms.info["input_index"] = i
            if e_hull[i] is not None:
                atoms.info["e_above_hull"] = e_hull[i]
        result["relaxation"] = _relaxation_summary(relaxed, computed)
        result["stability"] = {**metrics.stability_rates(e_hull, unique=unique, novel=novel),
                               "failures": _count_reasons(errors),
                               "e_hull_median": _median([e for e in e_hull if e is not None])}
        emitted = (result["validity"]["emitted"] or {}).get("all")
        if emitted and result["stability"]["n"]:
            # Re-sampled attempts (unparsed, too-close atoms) count too: rates per model output.
            scale = result["stability"]["n"] / emitted["emitted"]
            result["stability"]["over_emitted"] = {
                "emitted": emitted["emitted"],
                **{key: result["stability"][key] * scale for key in ("metastable", "stable", "sun", "msun")},
            }
    result["conditional"] = metrics.conditional_accuracy(structures)
    result["ipt"] = None
    if model is not None:
        with timer("ipt"):
            result["ipt"] = model_ipt(language_model, test_path, size=ipt_size, seed=seed, progress=progress)
            result["ipt"]["model"] = str(model)
    result["timings_s"] = timer.rounded()

    _write_samples_csv(out_dir / "samples.csv", structures, flags, unique, novel, e_hull, errors)
    _write_relaxed(out_dir / "relaxed.extxyz", relaxed)
    _write_atomic(out_dir / "metrics.json", json.dumps(result, indent=2, default=_json_default) + "\n")
    figures = _plots(out_dir, result, e_hull, fps, ref) if plots else []
    _write_atomic(out_dir / "report.md", report_markdown(result, figures))
    return result


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


def _distribution_metrics(fps, ref, n):
    scaler = metrics.CompositionScaler.fit(ref.composition[ref.ok])
    return {
        "coverage": {**metrics.coverage(fps, ref, n_total=n, scaler=scaler), "reference_size": len(ref)},
        "wasserstein": metrics.wasserstein(fps, ref),
        "diversity": metrics.diversity(fps, scaler),
    }


def _uniqueness_novelty(valid, train_path, progress):
    unique = metrics.unique_flags(valid)
    index = metrics.NoveltyIndex.from_csv(train_path)
    novel = [index.is_novel(s) for s in _bar(valid, progress, "novelty")]
    return unique, novel


def _relaxation_summary(relaxed, computed):
    return {
        "attempted": len(relaxed),
        "failed": sum(bool(a.info.get("relax_failed")) for a in relaxed),
        "not_converged": sum(a.info.get("relax_converged") is False for a in relaxed),
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


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _write_atomic(path, text):
    """Whole or not at all: an interrupted run never leaves half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_samples_csv(path, structures, flags, unique, novel, e_hull, errors):
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "formula", "structure_valid", "composition_valid", "unique", "novel",
                         "e_above_hull", "failure"])
        for i, atoms in enumerate(structures):
            writer.writerow([i, atoms.get_chemical_formula(), flags["structure"][i], flags["composition"][i],
                             unique[i], novel[i], "" if e_hull[i] is None else f"{e_hull[i]:.6f}",
                             errors[i] or ""])
    os.replace(tmp, path)


def _write_relaxed(path, relaxed):
    import ase.io

    if not relaxed:
        return
    tmp = path.with_name(path.stem + ".tmp.extxyz")
    out = []
    for atoms in relaxed:
        atoms = atoms.copy()
        atoms.calc = None  # energies already live in info
        out.append(atoms)
    ase.io.write(tmp, out, format="extxyz")
    os.replace(tmp, path)


# -- plots and report -------------------------------------------------------------
def _plots(out_dir, result, e_hull, fps, ref):
    settings.require("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []

    def save(fig, name):
        fig.tight_layout()
        tmp = out_dir / (name + ".tmp")
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, out_dir / name)
        plt.close(fig)
        figures.append(name)

    finite = np.array([e for e in e_hull if e is not None])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if finite.size:
        ax.hist(np.clip(finite, -0.5, 2.0), bins=50, color="tab:blue")
    ax.axvline(0.0, color="k", lw=1)
    ax.axvline(metrics.METASTABLE, color="tab:red", lw=1, ls="--", label=f"{metrics.METASTABLE} eV/atom")
    ax.set_xlabel("energy above MP-20 hull (eV/atom, clipped to [-0.5, 2])")
    ax.set_ylabel("samples")
    ax.legend()
    save(fig, "e_above_hull.png")

    rates = {
        "structural\nvalidity": result["validity"]["returned"]["structure"],
        "compositional\nvalidity": result["validity"]["returned"]["composition"],
        "valid": result["validity"]["returned"]["valid"],
        "metastable": result["stability"]["metastable"],
        "stable": result["stability"]["stable"],
        "S.U.N.": result["stability"].get("sun"),
    }
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(rates)
    ax.bar(names, [rates[k] or 0.0 for k in names], color="tab:green")
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of all samples")
    ax.tick_params(axis="x", labelsize=8)
    save(fig, "rates.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = np.linspace(0, max(15.0, float(np.max(ref.density, initial=0))), 60)
    ax.hist(ref.density, bins=bins, density=True, alpha=0.5, label=f"MP-20 test ({len(ref)})")
    if len(fps):
        ax.hist(fps.density, bins=bins, density=True, alpha=0.5, label=f"valid samples ({len(fps)})")
    ax.set_xlabel("density (g/cm$^3$)")
    ax.legend()
    save(fig, "density.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    top = int(max(np.max(ref.n_elements, initial=1), np.max(fps.n_elements, initial=1)))
    counts = np.arange(1, top + 1)
    width = 0.4
    ax.bar(counts - width / 2, [np.mean(ref.n_elements == c) for c in counts], width, label="MP-20 test")
    if len(fps):
        ax.bar(counts + width / 2, [np.mean(fps.n_elements == c) for c in counts], width, label="valid samples")
    ax.set_xlabel("number of elements")
    ax.set_ylabel("fraction")
    ax.legend()
    save(fig, "n_elements.png")
    return figures


def _fmt(value, percent=False):
    if value is None:
        return "n/a"
    if percent:
        return f"{100 * value:.1f}%"
    return f"{value:.4g}"


def report_markdown(result, figures=()):
    """A readable summary of :func:`evaluate`'s result."""
    v = result["validity"]["returned"]
    s = result["stability"]
    r = result["relaxation"]
    lines = [
        "# Evaluation report",
        "",
        f"Samples: `{result['samples']['source']}`, {result['samples']['n']} structures, "
        f"{result['samples']['n_valid']} valid.  Potential: {result['settings']['potential']} "
        f"(fmax {result['settings']['fmax']} eV/A, at most {result['settings']['steps']} steps).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| structural validity | {_fmt(v['structure'], True)} |",
        f"| compositional validity | {_fmt(v['composition'], True)} |",
        f"| validity (both) | {_fmt(v['valid'], True)} |",
        f"| coverage recall / precision | {_fmt(result['coverage']['recall'], True)} / "
        f"{_fmt(result['coverage']['precision'], True)} |",
        f"| Wasserstein density (g/cm^3) / #elements | {_fmt(result['wasserstein']['density'])} / "
        f"{_fmt(result['wasserstein']['n_elements'])} |",
        f"| diversity structure / composition | {_fmt(result['diversity']['structure'])} / "
        f"{_fmt(result['diversity']['composition'])} |",
        f"| uniqueness (of valid) | {_fmt(result['uniqueness'], True)} |",
        f"| novelty (of valid, vs MP-20 train) | {_fmt(result['novelty'], True)} |",
        f"| metastable (E_hull < {metrics.METASTABLE} eV/atom, of all) | {_fmt(s['metastable'], True)} |",
        f"| stable (E_hull <= 0, of all) | {_fmt(s['stable'], True)} |",
        f"| S.U.N. (of all) | {_fmt(s.get('sun'), True)} |",
        f"| median E_hull (eV/atom) | {_fmt(s.get('e_hull_median'))} |",
        "",
        f"Coverage reference: {result['coverage']['reference_size']} MP-20 test crystals.  "
        f"Relaxations: {r['attempted']} attempted, {r['failed']} failed, {r['not_converged']} not converged, "
        f"{r['from_cache']} from the cache.",
    ]
    if s.get("failures"):
        lines += ["", "Counted as failures in the stability rates: "
                  + ", ".join(f"{k} ({c})" for k, c in sorted(s["failures"].items())) + "."]
    emitted = result["validity"].get("emitted")
    if emitted:
        lines += ["", "## Validity over everything the model emitted", "",
                  "| decoding | emitted | returned | valid / emitted | valid / returned |", "|---|---|---|---|---|"]
        for name, e in emitted.items():
            lines.append(f"| {name} | {e['emitted']} | {e['returned']} | {_fmt(e['valid_over_emitted'], True)} | "
                         f"{_fmt(e['valid_over_returned'], True)} |")
        over = s.get("over_emitted")
        if over:
            lines += ["", f"Per model output ({over['emitted']} emitted): metastable {_fmt(over['metastable'], True)}, "
                      f"stable {_fmt(over['stable'], True)}, S.U.N. {_fmt(over['sun'], True)}."]
    cond = result.get("conditional") or {}
    if cond:
        lines += ["", "## Conditional accuracy", ""]
        if "formula" in cond:
            lines.append(f"- formula match: {_fmt(cond['formula']['match'], True)} of {cond['formula']['n']}")
        if "spacegroup" in cond:
            sg = cond["spacegroup"]
            parts = [f"{_fmt(val, True)} at symprec {key.rsplit('_', 1)[1]}" for key, val in sg.items()
                     if key.startswith("match")]
            lines.append(f"- space group match: {', '.join(parts)} of {sg['n']}")
    if result.get("ipt"):
        ipt = result["ipt"]
        lines += ["", "## Symmetry (IPT)", "",
                  f"IPT {_fmt(ipt['ipt'])} (normalised {_fmt(ipt['ipt_normalized'])}) over "
                  f"{ipt['n_structures']} test crystals x {ipt['n_translations']} translations, "
                  f"mean perplexity {_fmt(ipt['mean_perplexity'])}."]
    lines += ["", "## Caveats", "",
              "The hull is built from MP-20 (plus elemental references) only, not the full Materials Project: "
              "E_hull values and stability rates are not directly comparable with the paper's numbers."]
    if figures:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"
