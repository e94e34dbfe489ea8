"""Formula-constrained rows that do not crowd: the cell-volume room rule (issue #17).

A formula row may only write whole multiples of its formula, and the model, held
to elements it did not choose, keeps adding units until the cell is crowded (the
spacing guard then has no site left, the sample is rejected, and after five draws
the request gives up).  The room rule (``volume_ratio``, on by default) holds a
row, once its cell is written, to the formula units that fit with
``VOLUME_RATIO`` times their covalent-sphere volume each.

Measured here, on the same 100 MP-20 val formulas (pandas ``sample(random_state=0)``):

* the volume ratio of real crystals (cell volume over the summed covalent-sphere
  volumes of its atoms) on MP-20 train, which sets ``VOLUME_RATIO`` below almost all of them;
* per draw, with the rule off and at several ratios (the same seeds): the share of
  structurally valid draws, formula units, atoms per cell, density and volume ratio;
* ``gen.generate`` at the defaults (five draws per request): returned / asked,
  draws, give-ups, beside the same 100 real val crystals.

    nice python benchmarks/formula_room.py                  # ~10 min on one core
    python benchmarks/formula_room.py --model smollm2 --out /tmp/room_smollm2.json

Results: ``benchmarks/results/formula_room.json``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from common import report_header

from ase_crystal_llm import CrystalGenerator, settings
from ase_crystal_llm.chemistry.validity import (
    COVALENT_RATIO,
    MIN_DISTANCE,
    VOLUME_RATIO,
    cell_volume_ratio,
    structure_valid,
    too_dense,
)
from ase_crystal_llm.data.datasets import read_structures
from ase_crystal_llm.generation.constraints import formula_composition
from ase_crystal_llm.generation.decoding import fast_sample
from ase_crystal_llm.io.files import atomic_write
from ase_crystal_llm.text.format import CrystalTextError, text_to_atoms

RESULTS = Path(__file__).resolve().parent / "results" / "formula_room.json"
AMU_PER_A3_IN_G_PER_CM3 = 1.66054


def describe(crystals, formulas=None) -> dict:
    """Atoms per cell, density and volume ratio (medians, max density), and formula units when given."""
    if not crystals:
        return {"n": 0}
    density = [a.get_masses().sum() / a.get_volume() * AMU_PER_A3_IN_G_PER_CM3 for a in crystals]
    out = {"n": len(crystals), "atoms_per_cell_mean": float(np.mean([len(a) for a in crystals])),
           "density_median": float(np.median(density)), "density_max": float(np.max(density)),
           "volume_ratio_median": float(np.median([cell_volume_ratio(a) for a in crystals])),
           "densest": crystals[int(np.argmax(density))].get_chemical_formula(mode="metal")}  # fmt: skip
    if formulas is not None:
        units = [len(a) // sum(formula_composition(f).values()) for a, f in zip(crystals, formulas)]
        out["formula_units_mean"] = float(np.mean(units))
    return out


def per_draw(gen, formulas, ratio, draws, batch):
    """Decode ``draws`` rows per formula with the rule at ``ratio`` (None: off, as before the rule).

    A draw is kept when its atoms respect the distance floors and, with the rule, its cell is not
    smaller than ``ratio`` times its atoms' covalent volume (what ``generate`` returns).
    """
    grammar, max_new = gen.grammar(None, 20), gen.max_new_tokens(20)
    prompts = [gen.template.generation_prompt({"formula": f}) for f in formulas]
    valid, dense, parsed, asked = [], [], [], []
    start = time.perf_counter()
    for rep in range(draws):
        stream = torch.Generator().manual_seed(rep)
        for s in range(0, len(formulas), batch):
            rows = slice(s, s + batch)
            proc = grammar.processor(formulas[rows], MIN_DISTANCE, True, COVALENT_RATIO, volume_ratio=ratio)
            tokens, ended = fast_sample(gen.model, gen.tokenizer, prompts[rows], proc, max_new_tokens=max_new,
                                        temperature=1.0, top_p=1.0, generator=stream)
            for formula, ids, stop in zip(formulas[rows], tokens, ended):
                try:
                    atoms = text_to_atoms(gen.tokenizer.decode(ids, skip_special_tokens=True), max_atoms=20)
                except CrystalTextError:
                    continue
                parsed.append(atoms)
                asked.append(formula)
                spaced = stop and structure_valid(atoms, MIN_DISTANCE, covalent_ratio=COVALENT_RATIO)
                dense.append(spaced and ratio is not None and too_dense(atoms, ratio))
                valid.append(spaced and not dense[-1])
    ok = [a for a, v in zip(parsed, valid) if v]
    return {"volume_ratio": ratio, "draws": draws * len(formulas), "parsed": len(parsed),
            "kept_of_draws": sum(valid) / (draws * len(formulas)), "too_dense": int(sum(dense)),
            "seconds": time.perf_counter() - start,
            "all_parsed": describe(parsed, asked), "kept": describe(ok, [f for f, v in zip(asked, valid) if v])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model name or directory (default: the shipped default)")
    p.add_argument("--n", type=int, default=100, help="val formulas (default 100)")
    p.add_argument("--draws", type=int, default=2, help="draws per formula and setting (default 2)")
    p.add_argument("--ratios", default="none,0.9,1.2", help="settings of the per-draw comparison")
    p.add_argument("--train-limit", type=int, default=4000, help="MP-20 train crystals for the real ratios")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    header = report_header("formula_room", argv)  # the load average before the work

    train = read_structures(settings.mp20_path("train"), limit=args.train_limit)
    ratios = np.array([cell_volume_ratio(a) for a in train])
    percentiles = {str(q): float(np.percentile(ratios, q)) for q in (0, 0.1, 0.5, 1, 5, 50)}
    print("MP-20 train volume ratio percentiles", {k: round(v, 3) for k, v in percentiles.items()}, flush=True)

    rows = pd.read_csv(settings.mp20_path("val")).sample(args.n, random_state=0)
    formulas = list(rows["pretty_formula"])
    real = read_structures(settings.mp20_path("val"))
    by_id = {a.info.get("material_id"): a for a in real}
    real_rows = [by_id[m] for m in rows["material_id"]]

    gen = CrystalGenerator.from_pretrained(args.model, threads=1)
    settings_ = [None if r == "none" else float(r) for r in args.ratios.split(",")]
    draws = []
    for ratio in settings_:
        draws.append(per_draw(gen, formulas, ratio, args.draws, args.batch))
        print(f"per draw, volume ratio {ratio}: kept {draws[-1]['kept_of_draws']:.3f}", draws[-1]["kept"], flush=True)

    start = time.perf_counter()
    returned = gen.generate(len(formulas), formula=formulas, seed=0)
    defaults = {"seconds": time.perf_counter() - start, **gen.stats.as_dict(),
                "crystals": describe(returned, [a.info["condition_formula"] for a in returned])}  # fmt: skip
    print("gen.generate at the defaults:", {k: defaults[k] for k in ("returned", "attempts", "too_dense", "gave_up")},
          defaults["crystals"], flush=True)

    record = {
        **header,
        "model": args.model or "default",
        "settings": {"n": args.n, "draws": args.draws, "default_volume_ratio": VOLUME_RATIO,
                     "min_distance": MIN_DISTANCE, "covalent_ratio": COVALENT_RATIO, "temperature": 1.0,
                     "val_rows": "pandas sample(n, random_state=0)", "train_limit": args.train_limit},  # fmt: skip
        "mp20_train_volume_ratio_percentiles": percentiles,
        "real_val_rows": describe(real_rows, formulas),
        "per_draw": draws,
        "generate_defaults": defaults,
    }
    atomic_write(args.out, json.dumps(record, indent=1))
    print("written", args.out)


if __name__ == "__main__":
    main()
