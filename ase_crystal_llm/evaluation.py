"""The evaluation pipeline behind ``crystal-llm evaluate``.

:func:`evaluate` reads generated structures, computes the sample metrics of
:mod:`ase_crystal_llm.metrics` against the MP-20 splits (coverage and
distributions against the test split, novelty against the training split),
relaxes the valid samples with an ML potential (:func:`calculators.relax_many`,
cached in ``<out_dir>/relax_cache.db`` so an interrupted run resumes), takes
their energy above the MP-20 hull (:class:`hull.ReferenceHull`) and writes
``metrics.json``, ``report.md``, ``samples.csv``, ``relaxed.extxyz`` and plots.

The reference fingerprints of the test split (CrystalNN is slow: 0.1-0.5 s per
crystal) come from a precomputed file beside the split when one matches
(:func:`precomputed_path`), else are computed in chunks, in ``workers``
processes, and each chunk is cached as soon as it is finished in a user cache
folder (``$CRYSTAL_LLM_CACHE``, else ``$XDG_CACHE_HOME/ase-crystal-llm``, else
``~/.cache/ase-crystal-llm``), keyed by the split file's sha256, the fingerprint
version and the rows: an interrupted run loses at most one chunk per worker.
By default coverage uses a seeded subsample of :data:`COVERAGE_SIZE` test
crystals; the report says so, since the paper's protocol uses the full split.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import json
import math
import os
import signal
import threading
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np

from . import metrics, settings
from .modelcard import sha256_file

REFERENCES = ("mp20",)
FINGERPRINT_VERSION = 1  # bump when the fingerprint definition changes: retires cached chunks and precomputed files
COVERAGE_SIZE = 1000  # evaluate's default reference subsample; the paper's protocol is the full split ("all")
FINGERPRINT_CHUNK = 64  # crystals per cached chunk: ~10-30 s of work, the most an interrupt loses per worker
IPT_SIZE = 100


# -- caches and reference data ----------------------------------------------------
def cache_dir(path=None):
    """Folder for cached reference fingerprints (created if missing)."""
    path = settings.cache_dir(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_cifs(path):
    """The ``cif`` column of a CDVAE-style CSV (plain or gzipped), in file order."""
    csv.field_size_limit(1 << 30)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="") as handle:
        return [row["cif"] for row in csv.DictReader(handle)]


def _parse_cif(cif):
    from pymatgen.core import Structure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Structure.from_str(cif, fmt="cif")


def subsample_rows(n: int, size: int | None = None, seed: int = 0) -> np.ndarray:
    """Sorted rows of a seeded random subsample of ``size`` of ``n`` crystals (all when ``size`` is None or >= n)."""
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def precomputed_path(path) -> Path:
    """Where a precomputed fingerprint file of a whole split lives: ``test.csv.gz`` -> ``test_fingerprints.npz``."""
    path = Path(path)
    return path.with_name(path.name.split(".")[0] + "_fingerprints.npz")


def reference_fingerprints(path, *, size: int | None = None, seed: int = 0, cache=None, workers: int | None = None,
                           progress: bool = True, chunk_size: int = FINGERPRINT_CHUNK, label: str | None = None,
                           precomputed: bool = True) -> metrics.Fingerprints:
    """Fingerprints of a reference split, computed in chunks that are cached as they finish.

    Each finished chunk is written at once (atomically) under the cache folder, keyed by
    the split file's sha256, :data:`FINGERPRINT_VERSION` and its row indices, so an
    interrupted run keeps every finished chunk and the next call computes only the
    rows still missing; subsamples of the same file share rows.

    Parameters
    ----------
    path : path
        A CDVAE-style CSV (``cif`` column), e.g. MP-20 ``test.csv.gz``.
    size : int, optional
        Use a seeded random subsample of this many crystals (default: all).
    seed : int
        Seed of the subsample (:func:`subsample_rows`).
    cache : path, optional
        Cache folder (default :func:`cache_dir`).
    workers : int, optional
        Processes computing chunks (default 1: no process pool).
    progress : bool
        A tqdm bar while anything is computed (none when everything is cached).
    chunk_size : int
        Crystals per cached chunk: an interrupt loses at most one chunk per worker.
    label : str, optional
        Name of the split in the progress bar (default: the file name).
    precomputed : bool
        Use :func:`precomputed_path` of ``path`` when it exists and holds this
        fingerprint version for every row of the file.

    Returns
    -------
    metrics.Fingerprints
        One row per selected crystal, in file order.
    """
    return _reference(path, size=size, seed=seed, cache=cache, workers=workers, progress=progress,
                      chunk_size=chunk_size, label=label, precomputed=precomputed)[0]


def _reference(path, *, size=None, seed=0, cache=None, workers=None, progress=True, chunk_size=FINGERPRINT_CHUNK,
               label=None, precomputed=True):
    """:func:`reference_fingerprints` and a dict saying which rows were used and where they came from."""
    if size is not None and size < 1:
        raise ValueError(f"reference subsample size must be >= 1, got {size}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    cifs = _read_cifs(path)  # only the text: parsing all 9,046 CIFs alone takes ~45 s
    rows = subsample_rows(len(cifs), size, seed)
    info = {"size": len(rows), "split_size": len(cifs), "subsample": len(rows) < len(cifs), "seed": seed}
    full = _precomputed(path, len(cifs)) if precomputed else None
    if full is not None:
        return full.take(rows), {**info, "precomputed": len(rows), "from_cache": 0, "computed": 0}
    folder = cache_dir(cache) / f"fingerprints-{sha256_file(path)[:16]}-v{FINGERPRINT_VERSION}"
    done, fps = _load_chunks(folder, len(cifs))
    missing = rows[~np.isin(rows, done)]
    if len(missing):
        workers = min(workers or 1, -(-len(missing) // chunk_size))  # no more processes than chunks
        desc = _bar_description(label or Path(path).name, info, len(rows) - len(missing), workers)
        new_rows, new = _compute_chunks(folder, cifs, missing, workers=workers, chunk_size=chunk_size,
                                        bar=dict(total=len(rows), initial=len(rows) - len(missing), desc=desc,
                                                 disable=not progress, leave=False))
        done, fps = np.concatenate([done, new_rows]), metrics.Fingerprints.concatenate([fps, new])
    position = np.empty(len(cifs), dtype=int)
    position[done] = np.arange(len(done))  # a row held twice (two runs at once) is the same either way
    return fps.take(position[rows]), {**info, "precomputed": 0, "from_cache": len(rows) - len(missing),
                                      "computed": len(missing)}


def _precomputed(path, n):
    """The fingerprints in :func:`precomputed_path`, or None when absent or not for this version and row count."""
    file = precomputed_path(path)
    if not file.is_file():
        return None
    try:
        with np.load(file) as data:
            # shared/data/mp_20/test_fingerprints.npz has no version entry: it was made at version 1
            version = int(data["version"]) if "version" in data.files else 1
        fps = metrics.Fingerprints.load(file)
    except _DAMAGED as err:
        warnings.warn(f"ignoring {file}: {err}")
        return None
    if version != FINGERPRINT_VERSION or len(fps) != n:
        warnings.warn(f"ignoring {file}: fingerprint version {version} for {len(fps)} rows, "
                      f"expected version {FINGERPRINT_VERSION} for the {n} rows of {Path(path).name}")
        return None
    return fps


_DAMAGED = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)  # what reading a broken .npz raises


def _load_chunks(folder, n):
    """Rows and fingerprints of every cached chunk in ``folder``; damaged chunks are deleted (computed again)."""
    rows, parts = [np.empty(0, dtype=int)], []
    for file in sorted(folder.glob("rows-*.npz")):
        try:
            fps = metrics.Fingerprints.load(file)
            with np.load(file) as data:
                chunk = np.asarray(data["rows"], dtype=int)
            if len(chunk) != len(fps) or (len(chunk) and (chunk.min() < 0 or chunk.max() >= n)):
                raise ValueError("rows do not match")
        except _DAMAGED:
            file.unlink(missing_ok=True)
            continue
        rows.append(chunk)
        parts.append(fps)
    return np.concatenate(rows), metrics.Fingerprints.concatenate(parts)


def _save_chunk(folder, rows, fps):
    """Write one chunk atomically: a run killed mid-write leaves a hidden temporary file, never a half chunk."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = np.asarray(rows, dtype=np.int64)
    digest = hashlib.sha256(rows.tobytes()).hexdigest()[:12]
    target = folder / f"rows-{rows[0]}-{rows[-1]}-{digest}.npz"
    tmp = folder / f".{target.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as handle:
            fps.save(handle, rows=rows)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _bar_description(label, info, cached, workers):
    what = (f"{info['size']:,} of {info['split_size']:,} crystals" if info["subsample"]
            else f"{info['size']:,} crystals")
    extra = (f", {cached:,} already cached" if cached else "") + (f", {workers} processes" if workers > 1 else "")
    return f"reference fingerprints ({label}, {what}{extra}, cached for later runs)"


def _compute_chunks(folder, cifs, missing, *, workers, chunk_size, bar):
    """Fingerprint ``missing`` rows chunk by chunk, saving each chunk as soon as it is finished."""
    from tqdm.auto import tqdm

    tasks = [(chunk, [cifs[i] for i in chunk]) for chunk in
             (missing[i:i + chunk_size] for i in range(0, len(missing), chunk_size))]
    if workers == 1:
        metrics.featurizer()  # built before the bar starts, so its first time estimate is not 5 s per crystal
    rows, parts = [], []
    with tqdm(**bar) as progress:
        for chunk, fps in _map_chunks(tasks, workers, progress):
            _save_chunk(folder, chunk, fps)
            rows.append(chunk)
            parts.append(fps)
    return np.concatenate(rows), metrics.Fingerprints.concatenate(parts)


def _map_chunks(tasks, workers, progress):
    """Yield ``(rows, fingerprints)`` per task: here with 1 worker, else from worker processes as they finish."""
    if workers <= 1:
        for task in tasks:
            yield _fingerprint_chunk(task, tick=progress.update)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    # spawn: a forked copy of a process holding torch threads can deadlock; an executor (unlike
    # multiprocessing.Pool) raises when a worker dies instead of replacing it forever
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init)
    finished = False
    try:
        for future in as_completed([pool.submit(_fingerprint_chunk, task) for task in tasks]):
            chunk, fps = future.result()
            progress.update(len(chunk))
            yield chunk, fps
        finished = True
    except BrokenProcessPool as err:
        raise RuntimeError(f"a fingerprint worker died ({err}); finished chunks are in the cache") from err
    finally:
        if not finished:  # Ctrl-C or an error: stop now rather than after the running chunks
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
        pool.shutdown(wait=finished, cancel_futures=True)


def _worker_init():
    """Workers leave Ctrl-C to the parent, which stops them, and end when the parent dies (kill -9)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def exit_with_parent():  # an orphaned worker would otherwise wait for work forever
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()


def _fingerprint_chunk(task, tick=None):
    """Fingerprints of one chunk ``(rows, cifs)``, in a worker or here (``tick(1)`` after each crystal)."""
    rows, cifs = task
    parts = []
    for cif in cifs:
        parts.append(metrics.Fingerprints.from_structures([_parse_cif(cif)]))
        if tick is not None:
            tick(1)
    return rows, metrics.Fingerprints.concatenate(parts)


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
             cache=None, progress=True, plots=True, threads=None, table_db=False):
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
    coverage_size : int or "all", optional
        Test crystals for coverage and the Wasserstein distances: a seeded
        random subsample of this many (default :data:`COVERAGE_SIZE`), or
        ``"all"`` / ``0`` for the full split (the paper's protocol; 9,046 for
        MP-20).  ``metrics.json`` and the report say which was used.
    seed : int
        Seed of the reference subsample and of IPT's translations.
    cache : path, optional
        Folder for cached reference fingerprints (default :func:`cache_dir`).
    table_db : bool
        Also write ``samples.db``: the per-structure table as an ase.db, one row per
        sample (the relaxed structure with its energy where there is one, else the
        sample), the columns of ``samples.csv`` as key-value pairs.

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
    ref_size = _coverage_size(coverage_size)
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
                     "coverage_reference_size": None, "seed": seed,
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
    with timer("reference_fingerprints"):
        ref, ref_info = _reference(test_path, size=ref_size, seed=seed, cache=cache, workers=workers,
                                   progress=progress, label="MP-20 test")
        result["settings"]["coverage_reference_size"] = ref_info["size"]
    with timer("coverage"):
        fps = metrics.Fingerprints.from_structures(valid, workers=workers, progress=progress,
                                                   desc="sample fingerprints")
        result.update(_distribution_metrics(fps, ref, n))
        result["coverage"]["reference"] = {"split": "MP-20 test", **ref_info}
    with timer("novelty"):
        known = [train_path, settings.mp20_path("val", data_dir)]  # novel: in neither split the model could see
        unique, novel = _spread(valid_idx, n, *_uniqueness_novelty(valid, known, progress))
        result["settings"]["novelty_reference"] = "MP-20 train+val (pymatgen StructureMatcher)"
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
        (e_form,) = _spread(valid_idx, n, [_formation_energy(a, ref_hull) for a in relaxed], fill=(None,))
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

    result["settings"]["hull"] = ref_hull.name if relaxed else None
    per_structure = _per_structure(structures, flags, unique, novel, dict(zip(valid_idx, relaxed)), e_form, e_hull,
                                   errors, result["settings"]["hull"])
    _write_samples_csv(out_dir / "samples.csv", per_structure)
    if table_db:
        _write_samples_db(out_dir / "samples.db", structures, dict(zip(valid_idx, relaxed)), per_structure)
    _write_relaxed(out_dir / "relaxed.extxyz", relaxed)
    _write_atomic(out_dir / "metrics.json", json.dumps(result, indent=2, default=_json_default) + "\n")
    figures = _plots(out_dir, result, e_hull, fps, ref) if plots else []
    _write_atomic(out_dir / "report.md", report_markdown(result, figures))
    return result


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


def _distribution_metrics(fps, ref, n):
    scaler = metrics.CompositionScaler.fit(ref.composition[ref.ok])
    return {
        "coverage": {**metrics.coverage(fps, ref, n_total=n, scaler=scaler), "reference_size": len(ref)},
        "wasserstein": metrics.wasserstein(fps, ref),
        "diversity": metrics.diversity(fps, scaler),
    }


def _uniqueness_novelty(valid, known_paths, progress):
    unique = metrics.unique_flags(valid)
    index = metrics.NoveltyIndex.from_csv(known_paths)
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


def _formation_energy(relaxed, hull):
    if relaxed.info.get("relax_failed"):
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
        energy = done.info.get("energy") if done is not None else None
        e = e_hull[i]
        rows.append({
            "index": i, "formula": atoms.get_chemical_formula(), "structure_valid": flags["structure"][i],
            "composition_valid": flags["composition"][i], "unique": unique[i], "novel": novel[i],
            "potential": done.info.get("potential", "") if done is not None else "",
            "energy_per_atom": "" if energy is None else f"{energy / len(done):.6f}",
            "formation_energy_per_atom": "" if e_form[i] is None else f"{e_form[i]:.6f}",
            "e_above_hull": "" if e is None else f"{e:.6f}",
            "stable": e is not None and e <= 0.0, "metastable": e is not None and e < metrics.METASTABLE,
            "hull": hull or "", "failure": errors[i] or "",
        })  # fmt: skip
    return rows


def _write_samples_csv(path, rows):
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SAMPLE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _write_samples_db(path, structures, relaxed, rows):
    """``samples.csv`` as an ase.db (``ase db samples.db metastable=True``), written whole or not at all."""
    from .outputs import StructureWriter

    numeric = ("energy_per_atom", "formation_energy_per_atom", "e_above_hull")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.db")
    with StructureWriter(tmp) as writer:
        for i, row in enumerate(rows):
            done = relaxed.get(i)
            use_relaxed = done is not None and not done.info.get("relax_failed")
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


def _subsampled(result):
    return bool(((result.get("coverage") or {}).get("reference") or {}).get("subsample"))


def _reference_note(result):
    ref = (result.get("coverage") or {}).get("reference")
    if not ref:  # a result written before the reference was recorded
        return f"vs {result['coverage']['reference_size']} test crystals"
    return f"{ref['size']:,}-crystal subsample" if ref["subsample"] else "full test split"


def _reference_sentence(result):
    """What coverage was measured against, plainly: the paper's protocol is the full test split."""
    ref = (result.get("coverage") or {}).get("reference")
    if not ref:
        return f"Coverage reference: {result['coverage']['reference_size']} MP-20 test crystals."
    if not ref["subsample"]:
        return f"Coverage reference: the full MP-20 test split ({ref['size']:,} crystals), as in the paper's protocol."
    return (f"Coverage reference: **a random subsample of {ref['size']:,} of the {ref['split_size']:,} MP-20 test "
            f"crystals** (seed {ref['seed']}), not the full test split of the paper's protocol; "
            f"`--coverage-size {ref['split_size']}` uses the full split.")


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
        f"| coverage recall / precision ({_reference_note(result)}) | {_fmt(result['coverage']['recall'], True)} / "
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
        _reference_sentence(result),
        "",
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
    if _subsampled(result):
        lines += ["", "Coverage and the Wasserstein distances were measured against a subsample of the test split, "
                  "not the full split of the paper's protocol: they are not directly comparable with its numbers."]
    if figures:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"
