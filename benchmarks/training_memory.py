"""Resident memory of CPU training: glibc's heap with and without returning freed pages.

    nice python benchmarks/training_memory.py                 # 150 steps of the default model, each mode
    nice python benchmarks/training_memory.py --steps 60 --modes plain trim

Length-bucketed batches change shape every step; glibc's malloc raises its mmap
threshold after large frees, so freed activations stay in the heap, fragmented,
and the resident size of a run grows step after step.  ``crystal-llm train``
calls ``malloc_trim`` every ``TRIM_EVERY`` steps on CPU (default: every step).  Each mode trains the
shipped default model (``--base default --full``, batch 32, one torch thread)
in its own process; all modes run **side by side** so they share the machine's
load, and the step-time ratio between them is fair.  Modes: ``plain`` (no
trimming), ``trim`` (the package default, ``TRIM_EVERY``), ``trim10`` (every
10 steps).  Results:
``benchmarks/results/training_memory.json``.  Peak memory is the kernel's own
peak resident set (``getrusage``); the results recorded on 2026-12-05 before
that sampled the resident size once a second, which can only read lower.
"""

import argparse
import json
import multiprocessing as mp
import resource
import tempfile
from pathlib import Path

from common import report_header

RESULTS = Path(__file__).resolve().parent / "results" / "training_memory.json"


def _run(mode, steps, out_dir, queue):
    import numpy as np
    import torch

    from ase_crystal_llm import settings
    from ase_crystal_llm.model import training

    torch.set_num_threads(1)
    if mode == "plain":
        training.TRIM_EVERY = 0
    elif mode == "trim10":
        training.TRIM_EVERY = 10
    training.train(settings.mp20_path("train"), Path(out_dir) / mode, base="default", full=True, seed=9, lr=1e-4,
                   warmup_steps=10, batch_size=32, max_steps=steps, save_every=10**6, progress=False)
    log = json.loads((Path(out_dir) / mode / "training_log.json").read_text())["steps"]
    step_s = np.diff([e["time"] for e in log])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak resident set (KiB on Linux)
    queue.put({"mode": mode, "trim_every": training.TRIM_EVERY, "peak_rss_gb": round(peak / 2**30, 2),
               "median_step_s": round(float(np.median(step_s)), 3), "steps": len(log)})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--modes", nargs="+", default=["plain", "trim"], choices=["plain", "trim", "trim10"])
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    header = report_header("training_memory", argv)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as work:  # the runs' model folders
        procs = [ctx.Process(target=_run, args=(m, args.steps, work, queue)) for m in args.modes]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit("a training process failed: see its traceback above")
    rows = sorted((queue.get() for _ in procs), key=lambda r: args.modes.index(r["mode"]))
    base = next((r for r in rows if r["mode"] == "plain"), None)
    for r in rows:
        if base:
            r["step_time_vs_plain"] = round(r["median_step_s"] / base["median_step_s"], 3)
    result = {**header, "setup": {"model": "default (--full)", "batch_size": 32, "torch_threads": 1,
                                  "side_by_side": True}, "rows": rows}
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
