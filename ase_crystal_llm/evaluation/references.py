"""Reference fingerprints of an MP-20 split, for coverage.

CrystalNN is slow (0.1-0.5 s per crystal), so the fingerprints come from a
precomputed file beside the split when one matches (:func:`precomputed_path`),
else are computed in chunks, in ``workers`` processes, and each chunk is cached
as soon as it is finished in a user cache folder (``$CRYSTAL_LLM_CACHE``, else
``$XDG_CACHE_HOME/ase-crystal-llm``, else ``~/.cache/ase-crystal-llm``), keyed
by the split file's sha256, the fingerprint version and the rows: an
interrupted run loses at most one chunk per worker.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import threading
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np

from ase_crystal_llm import settings
from ase_crystal_llm.data.datasets import csv_column
from ase_crystal_llm.evaluation.metrics import Fingerprints, featurizer
from ase_crystal_llm.evaluation.options import COVERAGE_SIZE
from ase_crystal_llm.io.files import atomic_write
from ase_crystal_llm.model.modelcard import sha256_file

__all__ = [
    "COVERAGE_SIZE", "FINGERPRINT_CHUNK", "FINGERPRINT_VERSION", "cache_dir", "precomputed_path",
    "reference_fingerprints", "subsample_rows",
]


FINGERPRINT_VERSION = 1  # bump when the fingerprint definition changes: retires cached chunks and precomputed files


FINGERPRINT_CHUNK = 64  # crystals per cached chunk: ~10-30 s of work, the most an interrupt loses per worker


# -- caches and reference data ----------------------------------------------------
def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Folder for cached reference fingerprints (created if missing)."""
    path = settings.cache_dir(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_cifs(path):
    """The ``cif`` column of a CDVAE-style CSV (plain or gzipped), in file order."""
    return csv_column(path, "cif")


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


def precomputed_path(path: str | os.PathLike) -> Path:
    """Where a precomputed fingerprint file of a whole split lives: ``test.csv.gz`` -> ``test_fingerprints.npz``."""
    path = Path(path)
    return path.with_name(path.name.split(".")[0] + "_fingerprints.npz")


def reference_fingerprints(path: str | os.PathLike, *, size: int | None = None, seed: int = 0,
                           cache: str | os.PathLike | None = None, workers: int | None = None, progress: bool = True,
                           chunk_size: int = FINGERPRINT_CHUNK, label: str | None = None,
                           precomputed: bool = True) -> Fingerprints:
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
    Fingerprints
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
        done, fps = np.concatenate([done, new_rows]), Fingerprints.concatenate([fps, new])
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
        fps = Fingerprints.load(file)
    except _DAMAGED as err:
        warnings.warn(f"ignoring {file}: {err}", stacklevel=2)
        return None
    if version != FINGERPRINT_VERSION or len(fps) != n:
        warnings.warn(f"ignoring {file}: fingerprint version {version} for {len(fps)} rows, "
                      f"expected version {FINGERPRINT_VERSION} for the {n} rows of {Path(path).name}", stacklevel=2)
        return None
    return fps


_DAMAGED = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)  # what reading a broken .npz raises


def _load_chunks(folder, n):
    """Rows and fingerprints of every cached chunk in ``folder``; damaged chunks are deleted (computed again)."""
    rows, parts = [np.empty(0, dtype=int)], []
    for file in sorted(folder.glob("rows-*.npz")):
        try:
            fps = Fingerprints.load(file)
            with np.load(file) as data:
                chunk = np.asarray(data["rows"], dtype=int)
            if len(chunk) != len(fps) or (len(chunk) and (chunk.min() < 0 or chunk.max() >= n)):
                raise ValueError("rows do not match")
        except _DAMAGED:
            file.unlink(missing_ok=True)
            continue
        rows.append(chunk)
        parts.append(fps)
    return np.concatenate(rows), Fingerprints.concatenate(parts)


def _save_chunk(folder, rows, fps):
    """Write one chunk atomically: a run killed mid-write leaves a hidden temporary file, never a half chunk."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = np.asarray(rows, dtype=np.int64)
    digest = hashlib.sha256(rows.tobytes()).hexdigest()[:12]
    target = folder / f"rows-{rows[0]}-{rows[-1]}-{digest}.npz"
    data = io.BytesIO()
    fps.save(data, rows=rows)
    atomic_write(target, data.getvalue())


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
        featurizer()  # built before the bar starts, so its first time estimate is not 5 s per crystal
    rows, parts = [], []
    with tqdm(**bar) as progress:
        for chunk, fps in _map_chunks(tasks, workers, progress):
            _save_chunk(folder, chunk, fps)
            rows.append(chunk)
            parts.append(fps)
    return np.concatenate(rows), Fingerprints.concatenate(parts)


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
        parts.append(Fingerprints.from_structures([_parse_cif(cif)]))
        if tick is not None:
            tick(1)
    return rows, Fingerprints.concatenate(parts)
