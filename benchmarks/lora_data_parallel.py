"""Two data-parallel processes against one process on a 2-core CPU: SmolLM2-135M LoRA training.

The real command (``crystal-llm train --base smollm2-135m``, the paper's LoRA
recipe, answer-only logits) is run in turn as

* ``1proc_1thread``: one process, one torch thread;
* ``1proc_2threads``: one process, two torch threads;
* ``2proc_1thread``: ``torchrun --nproc_per_node 2``, one thread each (gloo on CPU).

Every variant sees the same optimiser steps: ``--batch-size B --grad-accum 2`` in one
process, ``--batch-size B`` in each of two (the trainer gives process *r* the
micro-batches that grad-accum step *r* would take), so their losses must agree and
their speeds compare like for like.  Throughput is answer-and-prompt tokens per
second over the steps after the first two (start-up and allocator warm-up); memory
is the peak resident set of the whole process tree, sampled every 0.2 s.  Run it on
an otherwise idle machine: the variants need both cores.

    python benchmarks/lora_data_parallel.py                      # ~25 min on a 2-core VM
    python benchmarks/lora_data_parallel.py --steps 4 --limit 200 --out /tmp/dp.json

Results: ``benchmarks/results/lora_data_parallel.json`` (hardware and date included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from common import report_header

from ase_crystal_llm import settings
from ase_crystal_llm.io.files import atomic_write

RESULTS = Path(__file__).resolve().parent / "results" / "lora_data_parallel.json"
WARM_STEPS = 2
VARIANTS = {  # name: (processes, threads per process)
    "1proc_1thread": (1, 1),
    "1proc_2threads": (1, 2),
    "2proc_1thread": (2, 1),
}


def _tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of a process and all its children."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _run(cmd: list[str], env: dict) -> tuple[float, int]:
    """Run ``cmd``; return its wall seconds and the peak RSS of its process tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watched, peak, done = psutil.Process(proc.pid), [0], threading.Event()

    def watch():
        while not done.wait(0.2):
            peak[0] = max(peak[0], _tree_rss(watched))

    threading.Thread(target=watch, daemon=True).start()
    output, _ = proc.communicate()
    done.set()
    if proc.returncode:
        sys.exit(f"lora_data_parallel: {' '.join(cmd[:4])} ... failed:\n{output[-3000:]}")
    return time.perf_counter() - t0, peak[0]


def _variant(name: str, args, work: Path) -> dict:
    processes, threads = VARIANTS[name]
    out = work / name
    train = ["-m", "ase_crystal_llm.cli", "train", "--base", args.base, "--data", str(args.data),
             "--out", str(out), "--max-steps", str(args.steps), "--limit", str(args.limit),
             "--batch-size", str(args.batch_size), "--grad-accum", str(2 // processes),
             "--warmup-steps", "1", "--threads", str(threads), "--seed", "0", "--no-progress"]  # fmt: skip
    if processes == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *train]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    wall, peak = _run(cmd, env)
    steps = json.loads((out / "training_log.json").read_text())["steps"]
    timed = steps[WARM_STEPS:]
    seconds = timed[-1]["time"] - steps[WARM_STEPS - 1]["time"]
    tokens = sum(s["tokens"] for s in timed)
    return {
        "processes": processes,
        "threads_per_process": threads,
        "wall_seconds": round(wall, 1),
        "timed_steps": len(timed),
        "seconds_per_step": round(seconds / len(timed), 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "peak_rss_gb": round(peak / 2**30, 2),
        "losses": [round(s["loss"], 5) for s in steps],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--data", type=Path, default=None, help="training CSV (default: MP-20 train)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch per process (global batch: 2x)")
    p.add_argument("--limit", type=int, default=2000, help="training rows read (start-up time)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.steps <= WARM_STEPS:
        sys.exit(f"lora_data_parallel: --steps must exceed {WARM_STEPS}")
    args.data = args.data or settings.mp20_path("train")
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        sys.exit(f"lora_data_parallel: unknown variant(s) {', '.join(sorted(unknown))}; known: {', '.join(VARIANTS)}")
    work = Path(tempfile.mkdtemp(prefix="lora_dp_"))
    header = report_header("lora_data_parallel", argv)  # the load average before the work
    try:
        results = {}
        for name in names:
            results[name] = _variant(name, args, work)
            print(name, {k: v for k, v in results[name].items() if k != "losses"}, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = results.get("1proc_1thread")
    ratios = {n: round(r["tokens_per_s"] / base["tokens_per_s"], 2) for n, r in results.items()} if base else {}
    losses = [r["losses"] for r in results.values()]
    record = {
        **header,
        "settings": {"base": args.base, "steps": args.steps, "warm_steps_not_timed": WARM_STEPS,
                     "micro_batch": args.batch_size, "global_batch": 2 * args.batch_size,
                     "data": str(args.data), "limit": args.limit},  # fmt: skip
        "variants": results,
        "speed_vs_1proc_1thread": ratios,
        "max_loss_difference": max(abs(a - b) for row in zip(*losses) for a, b in zip(row, row[1:]))
        if len(losses) > 1 else 0.0,
    }
    atomic_write(args.out, json.dumps(record, indent=1))
    print(json.dumps({"speed_vs_1proc_1thread": ratios, "max_loss_difference": record["max_loss_difference"]}))


if __name__ == "__main__":
    main()
