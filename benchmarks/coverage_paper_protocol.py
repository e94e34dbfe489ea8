"""Coverage at the paper's protocol: samples against the whole MP-20 test split, beside real crystals.

CDVAE's coverage (the paper's Table 1) takes the samples' CrystalNN and Magpie fingerprints
against all 9,046 test crystals.  ``crystal-llm evaluate`` defaults to a 1,000-crystal
subsample (``--coverage-size``); here both sizes are taken in one run, for

* ``--n`` crystals from a model at its defaults (``gen.generate(n, seed=...)``; only the
  structurally and compositionally valid ones are fingerprinted, the precision counts all);
* the same number of *real* MP-20 val crystals (a seeded sample): the coverage that real data
  itself reaches at this sample size, the yardstick of issue #17's target (precision at
  least 0.8x that of real val crystals).

The test fingerprints come from the data folder's ``mp_20/test_fingerprints.npz`` or the
fingerprint cache (:func:`~ase_crystal_llm.evaluation.references.reference_fingerprints`).

    python benchmarks/coverage_paper_protocol.py                   # ~15 min on 2 cores
    python benchmarks/coverage_paper_protocol.py --model smollm2 --n 300 --out /tmp/cov_smollm2.json

Results: ``benchmarks/results/coverage_paper_protocol.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import pandas as pd
from common import report_header

from ase_crystal_llm import CrystalGenerator, settings
from ase_crystal_llm.chemistry.validity import validity_flags
from ase_crystal_llm.data.datasets import read_structures
from ase_crystal_llm.evaluation.metrics import CompositionScaler, Fingerprints, coverage
from ase_crystal_llm.evaluation.references import reference_fingerprints
from ase_crystal_llm.io.files import atomic_write

RESULTS = Path(__file__).resolve().parent / "results" / "coverage_paper_protocol.json"
SUBSAMPLE = 1000  # evaluate's default reference size


def real_val(n: int, seed: int):
    """``n`` MP-20 val crystals, pandas ``sample(n, random_state=seed)``."""
    rows = pd.read_csv(settings.mp20_path("val")).sample(n, random_state=seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "val_sample.csv"
        rows.to_csv(path, index=False)
        return read_structures(path)


def scores(structures, references, workers):
    """Coverage of the valid structures against each reference (precision over all of them)."""
    valid = [s for s, ok in zip(structures, validity_flags(structures)["valid"]) if ok]
    fps = Fingerprints.from_structures(valid, workers=workers)
    out = {"n": len(structures), "valid": len(valid)}
    for name, ref in references.items():
        scaler = CompositionScaler.fit(ref.composition[ref.ok])
        out[name] = coverage(fps, ref, n_total=len(structures), scaler=scaler)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model name or directory (default: the shipped default)")
    p.add_argument("--n", type=int, default=1000, help="samples, and real val crystals (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    header = report_header("coverage_paper_protocol", argv)  # the load average before the work
    test = settings.mp20_path("test")
    references = {
        "full_test_split": reference_fingerprints(test, workers=args.workers, progress=False),
        f"test_subsample_{SUBSAMPLE}": reference_fingerprints(test, size=SUBSAMPLE, seed=args.seed,
                                                              workers=args.workers, progress=False),
    }
    gen = CrystalGenerator.from_pretrained(args.model, threads=1)
    samples = gen.generate(args.n, seed=args.seed)
    rows = {"samples": scores(samples, references, args.workers),
            "real_val": scores(real_val(args.n, args.seed), references, args.workers)}
    ratios = {name: rows["samples"][name]["precision"] / rows["real_val"][name]["precision"] for name in references}
    record = {
        **header,
        "model": args.model or "default",
        "settings": {"n": args.n, "seed": args.seed, "sampling": "the model card's defaults",
                     "generation_stats": gen.stats.as_dict(),
                     "reference_sizes": {name: len(ref) for name, ref in references.items()}},  # fmt: skip
        **rows,
        "precision_over_real_val": ratios,
    }
    atomic_write(args.out, json.dumps(record, indent=1))
    print(json.dumps({k: record[k] for k in ("samples", "real_val", "precision_over_real_val")}, indent=1))


if __name__ == "__main__":
    main()
