"""Training throughput: tokens/s and peak memory of ``ase_crystal_llm.training.train``.

CPU mode (default): from-scratch LLaMA sizes on MP-20 training crystals, each
size in a fresh process (so the peak resident memory is that size's own),
through the real training loop (length-bucketed batches, per-token loss,
AdamW, checkpoint at the end).

    python benchmarks/training_throughput.py                     # tiny, mini, small
    python benchmarks/training_throughput.py --sizes tiny small --threads 1 2

GPU mode: QLoRA (4-bit NF4) on the LLaMA-2-7B architecture with random
weights, at the reference implementation's batch settings (one crystal per
device and step), reporting step time, tokens/s and peak GPU memory.  The
random base is written once to ``--work`` (about 13.5 GB in bfloat16) and
loaded through the same ``--base ... --quantize 4bit`` path users take.

    python benchmarks/training_throughput.py --qlora-7b --work /scratch/bench

Results go to ``benchmarks/results/training_throughput.json`` (merged with
what is there, keyed by mode), with the hardware and date.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from common import hardware  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results" / "training_throughput.json"

# LLaMA-2-7B (meta-llama/Llama-2-7b-hf config.json)
LLAMA2_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip



def _steady(log, skip):
    steps = log["steps"][skip:] or log["steps"]
    tokens = sum(s["tokens"] for s in steps)
    seconds = steps[-1]["time"] - (log["steps"][skip - 1]["time"] if skip and len(log["steps"]) > skip else 0.0)
    return steps, tokens, seconds


def run_cpu_size(size, threads, steps, batch_size, limit):
    """One from-scratch size in this process; returns a result dict."""
    import torch

    from ase_crystal_llm import settings
    from ase_crystal_llm.model.training import LOG_NAME, train

    torch.set_num_threads(threads)
    skip = min(3, steps - 1)
    cpu = {}

    def cpu_clock(step, entry):  # CPU seconds used by this process, for a busy machine
        cpu[step] = time.process_time()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        card = train(
            str(settings.mp20_path("train")), Path(tmp) / "m", from_scratch=size, max_steps=steps,
            batch_size=batch_size, limit=limit, save_every=steps, progress=False, callbacks=[cpu_clock],
        )  # fmt: skip
        wall = time.perf_counter() - t0
        log = json.loads((Path(tmp) / "m" / LOG_NAME).read_text())
        weights = (Path(tmp) / "m" / "model.safetensors").stat().st_size
    timed, tokens, seconds = _steady(log, skip)
    return {
        "size": size,
        "threads": threads,
        "parameters": card.hyperparameters["parameters"],
        "weights_mb": round(weights / 1e6, 2),
        "batch_size": batch_size,
        "timed_steps": len(timed),
        "tokens_per_s": round(tokens / seconds, 1),
        "step_time_s": round(seconds / len(timed), 4),
        # tokens per CPU-second of this process: the throughput an idle core would give
        "tokens_per_cpu_s": round(tokens / (cpu[steps] - cpu[skip]), 1) if skip else None,
        "tokens_per_step": round(tokens / len(timed), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "wall_s_including_setup": round(wall, 1),
        "final_loss": log["steps"][-1]["loss"],
    }


def run_qlora_7b(work, steps, batch_size, grad_accum, limit):
    """QLoRA 4-bit on a random-weight LLaMA-2-7B; needs a CUDA GPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ase_crystal_llm import settings
    from ase_crystal_llm.model.training import LOG_NAME, train
    from ase_crystal_llm.text.prompts import PromptTemplate
    from ase_crystal_llm.text.tokenizer import tokenizer_for_template

    if not torch.cuda.is_available():
        raise SystemExit("--qlora-7b needs a CUDA GPU")
    work = Path(work)
    base = work / "llama2-7b-random"
    if not (base / "config.json").is_file():
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # initialise straight in bf16: 13.5 GB, not 27
        try:
            with torch.device("cuda"):
                model = LlamaForCausalLM(LlamaConfig(**LLAMA2_7B))
        finally:
            torch.set_default_dtype(default)
        model.save_pretrained(base, safe_serialization=True)
        # The crystal tokenizer stands in for LLaMA-2's (not reachable offline); both
        # write one token per digit, and its ids fit in the 32000-row embedding.
        tokenizer_for_template(PromptTemplate()).save_pretrained(base)
        del model
        torch.cuda.empty_cache()
    out = work / "qlora-run"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    card = train(
        str(settings.mp20_path("train")), out, base=str(base), quantize="4bit", max_steps=steps,
        batch_size=batch_size, grad_accum=grad_accum, limit=limit, save_every=steps, progress=False,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    log = json.loads((out / LOG_NAME).read_text())
    skip = min(3, steps - 1)
    timed, tokens, seconds = _steady(log, skip)
    return {
        "model": "LLaMA-2-7B architecture, random weights, 4-bit NF4 + LoRA r=8 alpha=32",
        "trainable_parameters": card.hyperparameters["trainable_parameters"],
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "timed_steps": len(timed),
        "step_time_s": round(seconds / len(timed), 4),
        "tokens_per_s": round(tokens / seconds, 1),
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "wall_s_including_load": round(wall, 1),
    }


def save(mode, payload):
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[mode] = payload
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS} [{mode}]")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mini", "small"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--limit", type=int, default=1024, help="training crystals read (CPU mode)")
    parser.add_argument("--qlora-7b", action="store_true", help="GPU mode: QLoRA 4-bit on LLaMA-2-7B architecture")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--work", default=None, help="folder for the random 7B base (GPU mode)")
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:  # child process: one CPU configuration, result as JSON on stdout
        size, threads = args.one[0], int(args.one[1])
        result = run_cpu_size(size, threads, args.steps, args.batch_size or 32, args.limit)
        print("RESULT " + json.dumps(result))
        return
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if args.qlora_7b:
        work = args.work or tempfile.mkdtemp(prefix="qlora7b-")
        result = run_qlora_7b(work, args.steps, args.batch_size or 1, args.grad_accum, args.limit)
        save("qlora_7b_gpu", {"date": date, "hardware": hardware(), "result": result})
        print(json.dumps(result, indent=2))
        return
    rows = []
    for size in args.sizes:
        for threads in args.threads:
            command = [sys.executable, __file__, "--one", size, str(threads), "--steps", str(args.steps),
                       "--limit", str(args.limit)]
            if args.batch_size:
                command += ["--batch-size", str(args.batch_size)]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            run = subprocess.run(command, capture_output=True, text=True, env=env)
            line = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
            if run.returncode or not line:
                raise SystemExit(f"{size}/{threads} failed:\n{run.stderr[-2000:]}")
            row = json.loads(line[0][7:])
            # The machine may be shared: the load says how much of it the run had.
            row.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       load_average_1min=round(os.getloadavg()[0], 2))  # fmt: skip
            rows.append(row)
            print(json.dumps(row))
    # Rows of earlier runs with other (size, threads) are kept.
    old = json.loads(RESULTS.read_text()).get("cpu_from_scratch", {}) if RESULTS.is_file() else {}
    done = {(r["size"], r["threads"]) for r in rows}
    rows = [r for r in old.get("results", []) if (r["size"], r["threads"]) not in done] + rows
    save("cpu_from_scratch", {
        "date": date, "hardware": hardware(),
        "note": "tokens = prompt + answer tokens of the batch (no padding); MP-20 train crystals, "
                "canonical cells; steady state after 3 warm-up steps; peak_rss is the whole process; "
                "load_average_1min > cores means other processes shared the CPU",
        "results": rows,
    })  # fmt: skip


if __name__ == "__main__":
    main()
