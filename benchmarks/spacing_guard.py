"""What the spacing guard (``generate(spacing_guard=...)``) costs and saves, guard on against off.

    nice python benchmarks/spacing_guard.py                 # the shipped model
    nice python benchmarks/spacing_guard.py --model DIR --relax 0

For each setting of the guard (the charge guard at its default: on since it
was added, so ``spacing_guard.json``, recorded before, had none) the script

* samples ``-n`` unconditional crystals with one draw each (``max_attempts=1``,
  seed 11) and counts those returned, i.e. structurally valid (it also times
  the sampling, which includes the guard's work);
* with ``--relax K`` (default 150): relaxes the first ``K`` valid
  (structure and SMACT) unconditional crystals with M3GNet and gives their
  metastable rate against the MP-20 hull, as ``tune_sampling.py --relax``.

Formula-constrained rows are never guarded (see ``constraints.CrystalLogitsProcessor``),
so only unconditional sampling is compared.  Results:
``benchmarks/results/spacing_guard.json`` (or ``--output``).
"""

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report_header  # noqa: E402


def run_setting(gen, args, **options):
    """One setting: ``args.n`` single draws with ``options`` for ``generate``, and the metastable rate."""
    from tune_sampling import metastable_rate

    from ase_crystal_llm.chemistry import validity

    start = time.perf_counter()
    crystals = gen.generate(args.n, seed=11, max_attempts=1, **options)
    seconds = time.perf_counter() - start
    flags = validity.validity_flags(crystals)
    valid = [a for a, ok in zip(crystals, flags["valid"]) if ok]
    row = {"options": options, "draws": gen.stats.attempts, "returned": len(crystals), "valid": len(valid),
           "composition_valid": sum(flags["composition"]), "sampling_seconds": round(seconds, 2)}
    if args.relax:
        stability = metastable_rate(valid, args.relax, args.cache, args.data)
        row["stability"] = stability
        row["metastable_per_draw"] = stability["metastable"] * row["valid"] / row["draws"]
    return row


def compare(name, settings_by_label, argv=None, description=None):
    """Run each labelled setting of ``generate`` options and write ``benchmarks/results/NAME.json``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", help="model directory (default: the shipped model)")
    p.add_argument("-n", type=int, default=300, help="unconditional draws per setting (default 300)")
    p.add_argument("--relax", type=int, default=150, metavar="K", help="valid crystals relaxed per setting (0: none)")
    p.add_argument("--data", help="folder with mp_20/ and hull/ (default $CRYSTAL_LLM_DATA or ../shared/data)")
    p.add_argument("--cache", help="cache folder for relaxations")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=str(Path(__file__).parent / "results" / f"{name}.json"))
    args = p.parse_args(argv)

    import torch

    from ase_crystal_llm import settings
    from ase_crystal_llm.generation.generator import CrystalGenerator

    torch.set_num_threads(args.threads)
    args.data = str(args.data or settings.data_dir())
    gen = CrystalGenerator.from_pretrained(args.model, device="cpu")
    gen.generate(8, seed=0)  # warm-up: the first batch pays for grammar masks
    result = {**report_header(name, argv), "model": str(gen.model_dir), "settings": vars(args), "guard": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # give-ups are counted, not warned about
        for label, options in settings_by_label.items():
            result["guard"][label] = run_setting(gen, args, **options)
            print(label, json.dumps(result["guard"][label]), flush=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


def main(argv=None):
    # The charge guard stays at its default (on since it was added; the recorded runs predate it).
    compare("spacing_guard", {"on": {}, "off": {"spacing_guard": False}}, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
