"""``crystal-llm generate``: sample to a file, resumably, in one or several processes.

:func:`generate_to_file` streams crystals to any :class:`~ase_crystal_llm.io.outputs.StructureWriter`
format as they are accepted, resumes an interrupted run from what the file
already holds, and under ``accelerate launch`` / ``torchrun`` splits the work
over processes (one part file per rank, merged at the end).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ase_crystal_llm.generation.generator import CrystalGenerator, _check_request, new_run_id
from ase_crystal_llm.generation.options import DEFAULT_MAX_ATOMS, DEFAULT_MAX_ATTEMPTS, GenerationOptions
from ase_crystal_llm.options import document_options

__all__ = [
    "generate_to_file",
]


def _processes():
    """The processes of ``accelerate launch`` / ``torchrun`` (just this one without a launcher).

    ``cpu=True`` on a CPU-only host, as in training: accelerate starts gloo
    processes (MULTI_CPU) only when asked.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _part_path(output, rank, world):
    if world == 1:
        return output
    return output.with_name(f"{output.stem}.part{rank}{output.suffix}")


def _summary(output, records):
    stats = [r.get("stats", {}) for r in records]
    attempts = sum(s.get("attempts", 0) for s in stats)
    returned = sum(s.get("returned", 0) for s in stats)
    failures = sum(sum(s.get("parse_failures", {}).values()) for s in stats)
    gave_up = sum(s.get("gave_up", 0) for s in stats)
    rejected = sum(s.get("rejected", 0) for s in stats)
    dense = sum(s.get("too_dense", 0) for s in stats)
    seconds = sum(s.get("seconds", 0.0) for s in stats) / max(1, len({r.get("rank") for r in records}))
    rate = failures / attempts if attempts else 0.0
    speed = returned / seconds if seconds else 0.0
    return (f"wrote {returned} crystals to {output}: parse failures {rate:.1%} of {attempts} samples"
            + (f", {rejected} rejected for atoms too close" if rejected else "")
            + (f", {dense} formula cells too small for their atoms" if dense else "")
            + (f", {gave_up} requested crystals gave up after max_attempts" if gave_up else "")
            + f"; {seconds:.1f} s, {speed:.2f} crystals/s")


# Not check_defaults: None here stands for "not given", kept out of the run record.
@document_options(GenerationOptions, check_defaults=False)
def generate_to_file(output: str | os.PathLike, n: int, *, model: str | os.PathLike | None = None,
                     base: str | None = None, device: str | torch.device | None = None, seed: int | None = None,
                     resume: bool = False, overwrite: bool = False, fast: bool = True, progress: bool = False,
                     max_attempts: int | None = None, max_atoms: int | None = None,
                     generator: CrystalGenerator | None = None, threads: int | None = None,
                     **kwargs: Any) -> str | None:
    """Sample ``n`` crystals into ``output`` as they come (the ``crystal-llm generate`` workflow).

    Every structure is durable once written, so an interrupted run keeps what
    it finished; ``resume=True`` adds only the crystals the output lacks
    (same run id and seed, taken from ``<output>.run.json``); an existing
    output is otherwise refused unless ``overwrite=True``.  Under
    ``accelerate launch`` the crystals are split over the processes (each
    with its own random stream) and gathered into ``output`` at the end.
    The generation options given (not ``None``) are recorded in the run
    record, and ``resume`` refuses different ones.

    Parameters
    ----------
    output : str or Path
        Output file in any :class:`~ase_crystal_llm.io.outputs.StructureWriter`
        format, or a database URL.
    n : int
        Number of crystals.
    model, base, device, threads : optional
        Passed to :meth:`CrystalGenerator.from_pretrained`, unless ``generator``
        (a loaded :class:`CrystalGenerator`) is given.
    resume, overwrite : bool
        Continue an interrupted run, or replace an existing output.
    progress : bool
        Show a progress bar (on the main process).
    {options}

    Returns
    -------
    str or None
        A one-line summary (on the main process).
    """
    from accelerate.utils import broadcast_object_list

    from ase_crystal_llm.io.outputs import check_output, is_db_url, output_format

    server = is_db_url(str(output))  # a database server: every process writes into it directly
    output = str(output) if server else Path(output)
    output_format(output)
    state = _processes()
    # Every process checks (so all fail alike) before the main one may change the output.
    check_output(output, overwrite=overwrite, resume=resume)
    state.wait_for_everyone()
    rank, world = state.process_index, state.num_processes
    main = rank == 0
    if device is None and world > 1:  # one process: the generator picks its device
        device = state.device
    max_attempts = DEFAULT_MAX_ATTEMPTS if max_attempts is None else max_attempts
    max_atoms = DEFAULT_MAX_ATOMS if max_atoms is None else max_atoms
    run_settings = {"n": int(n), **{k: v for k, v in kwargs.items() if v is not None},
                    "max_attempts": max_attempts, "max_atoms": max_atoms, "fast": fast}

    existing, run_id = set(), None
    if main:
        run_id, seed, existing = _start_or_resume(output, world, server, resume, run_settings, seed)
    run_id, seed, existing = broadcast_object_list([run_id, seed, existing])

    _check_request(n, kwargs, max_atoms)  # before the (slow) model load
    gen = generator or CrystalGenerator.from_pretrained(model, device=device, base=base, threads=threads)
    todo = [i for i in range(rank, int(n), world) if i not in existing]
    part = output if server else _part_path(output, rank, world)
    stream = gen.iter_generate(len(todo), indices=todo, run_id=run_id, rank=rank, seed=seed,
                               max_attempts=max_attempts, max_atoms=max_atoms, fast=fast, **kwargs)
    bar = _progress_bar(len(todo)) if progress and main else None
    session = uuid.uuid4().hex[:8]

    def record(status):
        entry = gen.run_record(**run_settings)
        entry.update(run_id=run_id, rank=rank, session=session, world_size=world, seed=seed, status=status,
                     output=str(output))
        return entry

    append = server or resume or world == 1 and output.exists()
    _write_stream(part, append, stream, gen, bar, record)
    state.wait_for_everyone()
    if not main:
        return None
    return _gather(output, world, server, run_id)


def _start_or_resume(output, world, server, resume, run_settings, seed):
    """On the main process: the run id, seed and sample indices already written (none for a new run)."""
    from ase_crystal_llm.io.outputs import StructureWriter

    parts = [_part_path(output, r, world) for r in range(world)] if world > 1 and not server else []
    if resume:
        run_id, seed, existing = _resume(output, parts, server, run_settings)
    else:
        run_id, seed = _start(output, parts, server, seed)
        existing = set()
    if server:  # create the tables once, before the other processes connect (they race otherwise)
        StructureWriter(output, append=True).close()
    return run_id, seed, existing


def _resume(output, parts, server, run_settings):
    """Run id, seed and written sample indices of the run to resume; its part files are merged first."""
    from ase_crystal_llm.io.outputs import StructureWriter, merge_outputs, read_run_records, run_record_path

    records = read_run_records(output) + [r for p in parts for r in read_run_records(p)]
    if not records:
        raise FileNotFoundError(f"cannot resume: no run record {run_record_path(output)}")
    previous = records[-1]
    _check_same_settings(run_settings, previous.get("settings", {}))
    run_id, seed = previous["run_id"], previous["seed"]
    merge_outputs([p for p in parts if p.exists()], output)
    existing = set()
    if server or output.exists():
        with StructureWriter(output, append=True) as w:
            existing = {i for r, i in w.existing if r == run_id}
    return run_id, seed, existing


def _check_same_settings(run_settings, previous):
    """Refuse to resume with settings other than the run's (``fast`` and ``batch_size`` may differ)."""
    changed = sorted(k for k in set(run_settings) | set(previous)
                     if k not in ("fast", "batch_size") and run_settings.get(k) != previous.get(k))
    if changed:
        raise ValueError(f"cannot resume with different settings: {', '.join(changed)} changed")


def _start(output, parts, server, seed):
    """A new run id and the seed (drawn unless given); a file output and its leftovers are removed."""
    from ase_crystal_llm.io.outputs import run_record_path

    seed = int(np.random.SeedSequence().entropy % (2**31)) if seed is None else int(seed)
    run_id = new_run_id()
    # A server keeps other runs' rows: the new run id keeps them apart.
    for path in [] if server else [output, run_record_path(output), Path(str(output) + ".ids"), *parts]:
        path.unlink(missing_ok=True)
    return run_id, seed


def _progress_bar(total):
    """The main process's bar, counting crystals."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="crystal", desc="generate", disable=not total)


def _write_stream(part, append, stream, gen, bar, record):
    """Write the crystals as they come, with the run record ``record(status)`` first, every 10 s and last."""
    from ase_crystal_llm.io.outputs import StructureWriter

    status = "interrupted"
    with StructureWriter(part, append=append) as writer:
        # Written first, so that a killed run (no chance to clean up) can be resumed.
        writer.write_run_record(record("running"))
        try:
            last = time.monotonic()
            written = 0
            for atoms in stream:
                writer.write(atoms)
                written += 1
                if bar is not None and written == gen.stats.returned:
                    # A batch arrives all at once: count it in one update, so the first
                    # rate and time estimate are per batch, not one crystal per batch time.
                    bar.update(written - bar.n)
                if time.monotonic() - last > 10:  # statistics survive a kill, up to 10 s old
                    writer.write_run_record(record("running"))
                    last = time.monotonic()
            status = "complete"
        finally:
            if bar is not None:
                bar.close()
            writer.write_run_record(record(status))


def _gather(output, world, server, run_id):
    """On the main process, once all are done: merge the part files and summarise this run."""
    from ase_crystal_llm.io.outputs import merge_outputs, read_run_records

    if world > 1 and not server:
        merge_outputs([_part_path(output, r, world) for r in range(world)], output)
    records = [r for r in read_run_records(output) if r.get("run_id") == run_id]
    return _summary(output, records)
