"""torch CPU threads for decoding and relaxation, on an idle machine and with one core busy.

Measures, in one process and with the same seeds, the shipped model decoding
crystals (both guards on) and M3GNet relaxing perturbed MP-20 test crystals
(``relax_many``), at 1 thread and at one per core; then the same while a
second process keeps one core busy (a pure-Python spin loop, as another job
would).  The thread rule of :func:`ase_crystal_llm.settings.default_threads`
comes from these numbers.  Each condition also times the README's
``crystal-llm generate -n 100`` in a fresh process (default threads, start-up
included).

    python benchmarks/threads.py          # writes benchmarks/results/threads.json
    python benchmarks/threads.py -n 16 --relax 4 -o /tmp/threads.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
from common import mp20_sample, report_header
from relax_throughput import perturb

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _spin(stop):
    while not stop.is_set():
        sum(range(10_000))


def time_decoding(generator, n, threads, seed=0):
    generator.threads = threads
    start = time.perf_counter()
    crystals = generator.generate(n, seed=seed, batch_size=32)
    return time.perf_counter() - start, len(crystals)


def time_relaxation(structures, threads):
    from ase_crystal_llm.evaluation.relaxation import relax_many

    start = time.perf_counter()
    relaxed = relax_many(structures, "m3gnet", threads=threads, fmax=0.1, steps=200)
    return time.perf_counter() - start, sum("energy" in a.info for a in relaxed)


def time_readme_command(n=100):
    """The README's ``crystal-llm generate`` (default threads) in a fresh process, start-up included."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run(["crystal-llm", "generate", "-n", str(n), "-o", f"{tmp}/out.extxyz"], check=True,
                       capture_output=True)
        return round(time.perf_counter() - start, 2)


def measure(generator, structures, n, cores):
    rows = {"readme_generate_100_s": time_readme_command()}
    for threads in sorted({1, cores}):
        seconds, returned = time_decoding(generator, n, threads)
        rows[f"decode_{threads}_threads_s"] = round(seconds, 2)
        rows[f"decode_{threads}_threads_returned"] = returned
        seconds, relaxed = time_relaxation(structures, threads)
        rows[f"relax_{threads}_threads_s"] = round(seconds, 2)
        rows[f"relax_{threads}_threads_relaxed"] = relaxed
    if cores > 1:
        rows["decode_speedup_of_more_threads"] = round(
            rows["decode_1_threads_s"] / rows[f"decode_{cores}_threads_s"], 2)
        rows["relax_speedup_of_more_threads"] = round(rows["relax_1_threads_s"] / rows[f"relax_{cores}_threads_s"], 2)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=64, help="crystals decoded per setting (default 64)")
    parser.add_argument("--relax", type=int, default=8, help="structures relaxed per setting (default 8)")
    parser.add_argument("-o", "--output", default=str(Path(__file__).parent / "results" / "threads.json"))
    args = parser.parse_args(argv)

    from ase_crystal_llm import CrystalGenerator, settings


    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    header = report_header("threads", argv)  # the load average before the model loads
    generator = CrystalGenerator.from_pretrained(device="cpu")
    rng = np.random.default_rng(0)
    structures = [perturb(a, rng) for a in mp20_sample(args.relax, seed=1)]
    generator.generate(4, seed=1)  # warm-up: grammar masks, first-call allocations
    result = {**header, "n_decoded": args.n, "n_relaxed": args.relax, "cores": cores,
              "parameters": sum(p.numel() for p in generator.model.parameters())}
    result["idle"] = {"load_average": list(os.getloadavg()), **measure(generator, structures, args.n, cores)}
    stop = mp.Event()
    spinner = mp.Process(target=_spin, args=(stop,), daemon=True)
    spinner.start()
    try:
        time.sleep(2)
        result["one_core_busy"] = {"load_average": list(os.getloadavg()),
                                   **measure(generator, structures, args.n, cores)}
    finally:
        stop.set()
        spinner.join()
    result["rule"] = {"small_model_parameters": settings.SMALL_MODEL_PARAMETERS,
                      "default_threads_for_this_model_now": settings.default_threads(result["parameters"]),
                      "default_threads_for_relaxation_now": settings.default_threads()}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "hardware"}, indent=2))


if __name__ == "__main__":
    main()
