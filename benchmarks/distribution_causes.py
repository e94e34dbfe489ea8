"""Why the default model's samples are not MP-20's distribution: sampling settings and guards, one at a time.

    nice python benchmarks/distribution_causes.py                 # the shipped model, 300 per setting
    nice python benchmarks/distribution_causes.py --model DIR -n 100

For each setting the model generates ``-n`` unconditional crystals with the
same seed, and the script reports their distribution (element-count mix,
atoms per cell, elements, space groups, density) and its distances to the
MP-20 test split (``--reference`` crystals), beside ``-n`` real validation
crystals against the same reference (the distance real data itself has):

* ``defaults``: the model card's temperature and top-p, both guards on (what
  ``generate`` returns);
* ``defaults, no guards``: the same sampling with the spacing guard
  (``min_distance=None``) and the charge guard off: what the model writes;
* ``T=1, top-p=1`` with and without guards: the model's own distribution,
  untruncated;
* ``T=1, top-p=1, spacing guard only`` and ``charge guard only``: what each
  guard adds.

Every parsed crystal is kept (outputs that do not parse are re-sampled, as
``generate`` does).  Results: ``benchmarks/results/distribution_causes.json``.
"""

import argparse
import json
import time
from pathlib import Path

from common import report_header

from ase_crystal_llm import settings
from ase_crystal_llm.evaluation.distribution import CrystalStatistics, distribution_summary, split_statistics
from ase_crystal_llm.generation.generator import CrystalGenerator
from ase_crystal_llm.io.files import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"

# name -> (temperature, top_p, spacing guard, charge guard); None: the model card's value
SETTINGS = {
    "defaults": (None, None, True, True),
    "defaults, no guards": (None, None, False, False),
    "T=1, top-p=1": (1.0, 1.0, True, True),
    "T=1, top-p=1, no guards": (1.0, 1.0, False, False),
    "T=1, top-p=1, spacing guard only": (1.0, 1.0, True, False),
    "T=1, top-p=1, charge guard only": (1.0, 1.0, False, True),
}


def sample(generator, n, seed, temperature, top_p, spacing, charge):
    kwargs = {"temperature": temperature, "top_p": top_p, "charge_guard": charge, "seed": seed}
    if not spacing:
        kwargs["min_distance"] = None  # no structural filter and no spacing guard
    t0 = time.perf_counter()
    crystals = generator.generate(n, **{k: v for k, v in kwargs.items() if v is not None or k == "min_distance"})
    return crystals, time.perf_counter() - t0


def _line(name, s):
    return (f"{name:34s} atoms/cell {s['mean_atoms_per_cell']:5.2f}  mix {s['element_count_mix']}  "
            f"O {s['oxygen_fraction']:.3f}  JSD count {s['element_count_jsd']:.3f} "
            f"cell {s['atoms_per_cell_jsd']:.3f} elements {s['element_jsd']:.3f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory (default: the shipped model)")
    parser.add_argument("-n", type=int, default=300, help="crystals per setting and real crystals (default 300)")
    parser.add_argument("--reference", type=int, default=1000, help="MP-20 test crystals (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--output", default=str(RESULTS / "distribution_causes.json"))
    args = parser.parse_args(argv)

    generator = CrystalGenerator.from_pretrained(args.model, threads=args.threads)
    reference = split_statistics(settings.mp20_path("test"), args.reference, seed=args.seed)
    real = split_statistics(settings.mp20_path("val"), args.n, seed=args.seed)
    results = {**report_header("distribution_causes", argv),
               "model": str(args.model or settings.DEFAULT_MODEL_DIR), "n": args.n,
               "reference": f"{args.reference} MP-20 test crystals", "real": f"{args.n} MP-20 val crystals",
               "card_sampling": dict(zip(("temperature", "top_p"), generator._sampling_defaults())),
               "settings": {}}
    for name in args.settings:
        temperature, top_p, spacing, charge = SETTINGS[name]
        crystals, seconds = sample(generator, args.n, args.seed, temperature, top_p, spacing, charge)
        summary = distribution_summary(CrystalStatistics.from_structures(crystals), reference, real)
        results["settings"][name] = {"temperature": temperature, "top_p": top_p, "spacing_guard": spacing,
                                     "charge_guard": charge, "seconds": round(seconds, 1),
                                     "samples": summary["samples"]}
        results["real_val"] = summary["real"]
        results["reference_mix"] = summary["reference"]
        print(_line(name, summary["samples"]), flush=True)
    print(_line("real val", results["real_val"]))
    atomic_write(args.output, json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
