"""CPU generation throughput: our fast sampler against plain ``model.generate``.

    python benchmarks/generation_cpu.py                 # default model, or a random "small" one
    python benchmarks/generation_cpu.py --model DIR     # any model directory

Both paths sample under the same crystal grammar, temperature and top-p, on
the same model in the same process, threads pinned to ``--threads`` (2 by
default: the target machine has 2 cores).  For each batch size it reports
samples/s (every attempt), crystals/s (parsed), tokens/s, and the speed-up at
each path's best batch size.  The first measurement is ``--n`` parsed crystals
through ``CrystalGenerator.generate`` including start-up (imports, model
load), timed from process start.  Then, at ``--defaults-batch-sizes``,
``gen.generate(..., fast=True)`` against ``fast=False`` as a user calls them:
the model card's sampling settings with both guards on, alternated on the
same seeds (crystals returned per second).

Model: ``--model``, else the default model when the package ships one, else
a *proxy*: a from-scratch ``mini`` LLaMA trained here on MP-20 for
``--proxy-steps`` steps (cached in the temp folder; training time is not
counted), so that it ends crystals at realistic lengths and parses some of
them.  ``--random`` uses random weights of ``--size`` instead (every row runs
to ``--max-atoms``; parse rates near zero).  The result file names the model.
Results: ``benchmarks/results/generation_cpu.json``.
"""

import time

T0 = time.perf_counter()

# The imports below come after T0 on purpose: their time is measured (IMPORT_SECONDS), hence the noqa: E402.
import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from common import cpu_name  # noqa: E402

from ase_crystal_llm import settings  # noqa: E402
from ase_crystal_llm.generation.decoding import fast_sample, plain_sample  # noqa: E402
from ase_crystal_llm.generation.generator import CrystalGenerator  # noqa: E402
from ase_crystal_llm.model.modelcard import DEFAULT_TEMPERATURE, DEFAULT_TOP_P  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - T0

RESULTS = Path(__file__).parent / "results"



def proxy_model(steps, size="mini", limit=3000):
    """A from-scratch model trained briefly on MP-20 (cached): a stand-in for the default model."""
    import tempfile

    from ase_crystal_llm.model.training import train

    out = Path(tempfile.gettempdir()) / "ase_crystal_llm_bench" / f"proxy-{size}-{steps}"
    if not (out / "crystal_llm.json").is_file():
        print(f"training the proxy model ({size}, {steps} steps) into {out} ...", flush=True)
        train(settings.mp20_path("train"), out, from_scratch=size, max_steps=steps, batch_size=32, limit=limit,
              lr=2e-3, progress=False, eval_every=10**9, save_every=10**9)
    return out, f"proxy: from-scratch '{size}' LLaMA trained {steps} steps (batch 32) on {limit} MP-20 crystals"


def load(model_dir, size, seed=0, random=False, proxy_steps=300):
    if model_dir is None and (settings.DEFAULT_MODEL_DIR / "crystal_llm.json").is_file():
        model_dir = settings.DEFAULT_MODEL_DIR
    if model_dir is None and not random:
        model_dir, desc = proxy_model(proxy_steps)
        return CrystalGenerator.from_pretrained(model_dir, device="cpu"), desc
    if model_dir is not None:
        return CrystalGenerator.from_pretrained(model_dir, device="cpu"), f"model directory {model_dir}"
    from transformers import LlamaForCausalLM

    from ase_crystal_llm.model.config import scratch_config
    from ase_crystal_llm.text.prompts import PromptTemplate
    from ase_crystal_llm.text.tokenizer import tokenizer_for_template

    torch.manual_seed(seed)
    tok = tokenizer_for_template(PromptTemplate())
    model = LlamaForCausalLM(scratch_config(size, tok)).eval()
    n_params = sum(p.numel() for p in model.parameters())
    return CrystalGenerator(model, tok), f"randomly initialised from-scratch '{size}' LLaMA ({n_params:,} parameters)"


def run_path(gen, sampler, batch, n_rows, max_atoms, temperature, top_p, seed):
    """Sample ``n_rows`` rows in batches; returns samples/s, crystals/s, tokens/s."""
    from ase_crystal_llm.text.format import CrystalTextError, text_to_atoms

    grammar = gen.grammar(None, max_atoms)
    prompt = gen.template.generation_prompt({})
    limit = gen.max_new_tokens(max_atoms)
    done = parsed = tokens = 0
    start = time.perf_counter()
    k = 0
    while done < n_rows:
        rows = min(batch, n_rows - done)
        g = torch.Generator().manual_seed(seed + k)
        k += 1
        ids, ended = sampler(gen.model, gen.tokenizer, [prompt] * rows, grammar.processor(), max_new_tokens=limit,
                             temperature=temperature, top_p=top_p, generator=g)
        for row, stop in zip(ids, ended):
            tokens += len(row) + int(stop)
            try:
                text_to_atoms(gen.tokenizer.decode(row, skip_special_tokens=True), max_atoms=max_atoms)
                parsed += int(stop)
            except CrystalTextError:
                pass
        done += rows
    seconds = time.perf_counter() - start
    return {"samples_per_s": done / seconds, "crystals_per_s": parsed / seconds, "tokens_per_s": tokens / seconds,
            "seconds": seconds, "samples": done, "parsed": parsed, "tokens": tokens}


def run_defaults(gen, fast, batch, n, seed):
    """``gen.generate`` at the model's defaults (both guards, its sampling settings), as a user calls it."""
    start = time.perf_counter()
    gen.generate(n, batch_size=batch, seed=seed, fast=fast)
    seconds = time.perf_counter() - start
    stats = gen.stats
    return {"draws_per_s": stats.attempts / seconds, "crystals_per_s": stats.returned / seconds,
            "seconds": seconds, "draws": stats.attempts, "returned": stats.returned,
            "tokens": stats.tokens_generated}


def defaults_comparison(gen, batch, n, repeats):
    """Fast against plain decoding through ``gen.generate`` with both guards, alternated on the same seeds."""
    runs = {"fast": [], "plain": []}
    for r in range(repeats):
        for name in runs:
            runs[name].append(run_defaults(gen, name == "fast", batch, n, seed=r))
    best = {name: max(res, key=lambda x: x["crystals_per_s"]) for name, res in runs.items()}
    ratio = best["fast"]["crystals_per_s"] / best["plain"]["crystals_per_s"]
    print(f"defaults, batch {batch}: fast {best['fast']['crystals_per_s']:.2f}, plain "
          f"{best['plain']['crystals_per_s']:.2f} crystals/s ({ratio:.2f}x)", flush=True)
    return {"batch_size": batch, "crystals": n, "runs": runs, "best": best, "speedup_crystals_per_s": ratio}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: the shipped model, else a random one)")
    ap.add_argument("--size", default="small", help="from-scratch size of the --random model (default small)")
    ap.add_argument("--random", action="store_true", help="random weights instead of the trained proxy")
    ap.add_argument("--proxy-steps", type=int, default=200, help="training steps of the proxy model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=100, help="crystals of the start-up run (default 100)")
    ap.add_argument("--rows", type=int, default=64, help="samples per path and batch size (default 64)")
    ap.add_argument("--batch-sizes", default="8,16,32,64")
    ap.add_argument("--max-atoms", type=int, default=20, help="MP-20 has at most 20 atoms per cell")
    ap.add_argument("--temperature", type=float, help="default: the model card's")
    ap.add_argument("--top-p", type=float, help="default: the model card's")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs per setting")
    ap.add_argument("--defaults-batch-sizes", default="32,64",
                    help="batch sizes of the gen.generate comparison at the model's defaults (both guards)")
    ap.add_argument("--out", default=str(RESULTS / "generation_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    shipped = (settings.DEFAULT_MODEL_DIR / "crystal_llm.json").is_file()
    if args.model is None and not args.random and not shipped:
        proxy_model(args.proxy_steps)  # trained (once) before the clock that counts start-up
    t_start = time.perf_counter() if args.model is None and not args.random else T0
    gen, model_desc = load(args.model, args.size, random=args.random, proxy_steps=args.proxy_steps)
    t_loaded = time.perf_counter() - t_start
    sampling = getattr(gen.card, "sampling", None) or {}
    if args.temperature is None:
        args.temperature = sampling.get("temperature", DEFAULT_TEMPERATURE)
    args.top_p = sampling.get("top_p", DEFAULT_TOP_P) if args.top_p is None else args.top_p
    batches = [int(b) for b in args.batch_sizes.split(",")]
    # Start-up run: N parsed crystals (random weights parse rarely: attempts are capped).
    gen.generate(args.n, seed=0, max_atoms=args.max_atoms, batch_size=max(batches), max_attempts=20,
                 temperature=args.temperature, top_p=args.top_p)
    startup = {"crystals": gen.stats.returned, "requested": args.n, "attempts": gen.stats.attempts,
               "seconds_including_startup": time.perf_counter() - t_start + IMPORT_SECONDS,
               "import_seconds": IMPORT_SECONDS, "load_seconds": t_loaded,
               "raw_parse_rate": gen.stats.raw_parse_rate, "batch_size": max(batches)}
    print(f"start-up run: {startup}", flush=True)

    defaults = [defaults_comparison(gen, int(b), args.rows, args.repeats)
                for b in args.defaults_batch_sizes.split(",") if b]
    sweep = {"fast": {}, "plain": {}}
    for batch in batches:
        for name, sampler in (("fast", fast_sample), ("plain", plain_sample)):
            runs = [run_path(gen, sampler, batch, args.rows, args.max_atoms, args.temperature, args.top_p, seed=r)
                    for r in range(args.repeats)]
            best = max(runs, key=lambda r: r["samples_per_s"])
            sweep[name][batch] = best
            print(f"{name:5s} batch {batch:3d}: {best['samples_per_s']:.2f} samples/s, "
                  f"{best['crystals_per_s']:.2f} crystals/s, {best['tokens_per_s']:.0f} tokens/s", flush=True)
    best = {name: max(res.items(), key=lambda kv: kv[1]["samples_per_s"]) for name, res in sweep.items()}
    speedup = best["fast"][1]["samples_per_s"] / best["plain"][1]["samples_per_s"]
    result = {
        "benchmark": "generation_cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
                     "load_average_1_5_15min": os.getloadavg()},
        "model": model_desc,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "startup_run": startup,
        "sweep": {name: {str(b): r for b, r in res.items()} for name, res in sweep.items()},
        "best": {name: {"batch_size": b, **r} for name, (b, r) in best.items()},
        "speedup_best_vs_best_samples_per_s": speedup,
        "defaults": defaults,
        "targets": {"speedup>=2": speedup >= 2,
                    **{f"defaults speedup>=2 at batch {d['batch_size']}": d["speedup_crystals_per_s"] >= 2
                       for d in defaults},
                    "100 crystals < 60 s incl. start-up": startup["crystals"] >= args.n
                    and startup["seconds_including_startup"] < 60},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"speed-up (best batch each): {speedup:.2f}x; written {args.out}")


if __name__ == "__main__":
    main()
