"""Peak memory of streaming generation: N = 10,000 against N = 1,000.

Generation streams every finished batch to its output file, so memory must
not grow with the number of crystals requested.  Each N runs in a fresh
process (``crystal-llm generate`` through :func:`ase_crystal_llm.cli.main`,
or the library's ``iter_generate`` + ``StructureWriter`` with ``--library``);
the process reports its peak resident set size (``VmHWM``) and its RSS
right after loading the model.  Target: peak(10,000) within 20% of
peak(1,000).

Usage::

    python benchmarks/generation_memory.py [--model DIR] [--sizes 1000 10000] [--batch-size 64] [--threads 1]

Writes ``benchmarks/results/generation_memory.json`` (hardware, date, peaks).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import report_header  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "generation_memory.json"
TARGET = 1.20


def _status_kib(field):
    """A memory field of /proc/self/status (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args):
    """Generate N crystals into a file; print the memory figures as JSON."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ase_crystal_llm.generation.generator import CrystalGenerator

    out = Path(args.workdir) / f"samples_{args.child}.{args.format}"
    start = time.perf_counter()
    if args.library:
        from ase_crystal_llm.io.outputs import StructureWriter

        gen = CrystalGenerator.from_pretrained(args.model, device="cpu")
        after_load = _status_kib("VmRSS")
        with StructureWriter(out) as writer:
            for atoms in gen.iter_generate(args.child, seed=0, batch_size=args.batch_size):
                writer.write(atoms)
        written = writer.written
    else:
        from ase.io import iread

        from ase_crystal_llm import cli


        CrystalGenerator.from_pretrained(args.model, device="cpu")  # warm imports, for the after-load figure
        after_load = _status_kib("VmRSS")
        status = cli.main(["generate", "-n", str(args.child), "-o", str(out), "--model", args.model,
                           "--device", "cpu", "--seed", "0", "--batch-size", str(args.batch_size)])
        if status:
            raise SystemExit(f"crystal-llm generate failed with status {status}")
        written = sum(1 for _ in iread(str(out), index=":"))
    seconds = time.perf_counter() - start
    print(json.dumps({"n": args.child, "written": written, "seconds": round(seconds, 1),
                      "rss_after_load_mib": round(after_load / 1024, 1),
                      "peak_rss_mib": round(_status_kib("VmHWM") / 1024, 1)}))


def build_tiny_model(path):
    """A ``tiny`` from-scratch model over-fitted on four crystals: fast, and every sample parses."""
    import torch
    from ase.build import bulk

    from ase_crystal_llm.model.training import train

    crystals = [bulk("NaCl", "rocksalt", a=5.64), bulk("Si", "diamond", a=5.43), bulk("Cu", "fcc", a=3.6),
                bulk("MgO", "rocksalt", a=4.2)] * 16
    torch.set_num_threads(1)
    train(crystals, path, from_scratch="tiny", max_steps=120, batch_size=8, lr=3e-3, save_every=120, seed=0,
          cache=False, progress=False)
    return str(path)



def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a (tiny) model directory written by 'crystal-llm train' "
                   "(default: build the over-fitted tiny model of tests/test_crash_safety.py, ~20 s)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (OMP_NUM_THREADS); on a busy machine 1 is many times faster than 2")
    p.add_argument("--format", default="extxyz", help="output extension (extxyz, db, traj, cif, crystxt)")
    p.add_argument("--library", action="store_true", help="call iter_generate + StructureWriter, not the CLI")
    p.add_argument("-o", "--output", type=Path, default=RESULTS)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        return child(args)

    runs = []
    with tempfile.TemporaryDirectory() as workdir:
        model_note = args.model
        if args.model is None:
            args.model = build_tiny_model(Path(workdir) / "model")
            model_note = "tiny from-scratch model over-fitted on 4 simple crystals (built by the benchmark)"
        for n in args.sizes:
            cmd = [sys.executable, __file__, "--child", str(n), "--workdir", workdir, "--model", args.model,
                   "--batch-size", str(args.batch_size), "--format", args.format]
            cmd += ["--library"] if args.library else []
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"N={n} failed:\n{proc.stderr[-3000:]}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    small, large = runs[0], runs[-1]
    ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
    result = {
        **report_header("generation_memory", argv),
        "model": str(model_note),
        "path": "library (iter_generate + StructureWriter)" if args.library else "crystal-llm generate (cli.main)",
        "output_format": args.format,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "runs": runs,
        "peak_ratio": round(ratio, 3),
        "target_ratio": TARGET,
        "passed": ratio <= TARGET,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"peak_ratio": result["peak_ratio"], "passed": result["passed"]}))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
