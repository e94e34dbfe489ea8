"""Choose the default classifier-free guidance scale per condition kind, on the MP-20 *validation* split.

    nice python benchmarks/tune_guidance.py                          # the shipped model, 100 val rows
    nice python benchmarks/tune_guidance.py --model DIR -n 20 --scales 1 2 --kinds formula
    nice python benchmarks/tune_guidance.py --model smollm2 --scales 1 --temperature 1 --top-p 1

The rows are those of the recorded evaluation (``benchmarks/evaluate_default_model.sh``:
100 val rows, pandas ``sample(random_state=0)``).  For each condition kind and
guidance scale the model writes one crystal per row with ``generate``'s
defaults (guards on unless ``--no-guards``, the card's sampling settings unless
``--temperature`` / ``--top-p``), except that the formula is
only written into the prompt (``constrain_formula=False``), so every match is
the model's own:

* ``formula``: the row's formula; score: formula match over the rows asked;
* ``spacegroup``: the row's formula and space group (training always writes
  the formula first); score: space-group match (symprec 0.1) over the rows
  asked; the formula match is reported too.

Scale 1 is the unguided model.  Per kind, the chosen scale is the smallest
whose score lies within one binomial standard error (at least one row) of the
best score: closer scores are noise at these sizes, and a smaller scale is
cheaper and closer to the model.  Validity over all model
outputs is reported beside, so a scale that buys matches with broken crystals
shows.  Results: ``benchmarks/results/tune_guidance.json`` (``-o``), written
after every (kind, scale), and a rerun skips the rows it holds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from common import report_header  # noqa: E402
from tune_sampling import sample, validity

from ase_crystal_llm import settings
from ase_crystal_llm.evaluation import metrics
from ase_crystal_llm.generation.generator import CrystalGenerator
from ase_crystal_llm.io.files import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"
SYMPREC = 0.1


def val_rows(path, n, seed=0):
    """The recorded evaluation's condition rows: ``(formulas, space groups)``."""
    rows = pd.read_csv(path).sample(n, random_state=seed)
    return list(rows["pretty_formula"]), [int(g) for g in rows["spacegroup.number"]]


def measure(gen, kind, scale, formulas, groups, seed, guards=True, **sampling):
    conditions = {"formula": formulas} if kind == "formula" else {"formula": formulas, "spacegroup": groups}
    crystals, stats = sample(gen, len(formulas), seed=seed, guidance_scale=scale, constrain_formula=False,
                             spacing_guard=guards, charge_guard=guards, **sampling, **conditions)
    row, _ = validity(crystals, stats)
    accuracy = metrics.conditional_accuracy(crystals, symprecs=(SYMPREC,))
    share = len(crystals) / len(formulas)  # rates of returned crystals -> of the rows asked
    row["formula_match_requested"] = accuracy["formula"]["match"] * share if crystals else 0.0
    if kind == "spacegroup":
        for key in ("match", "crystal_system_match"):
            rate = accuracy["spacegroup"][f"{key}_symprec_{SYMPREC}"] if crystals else 0.0
            row[f"spacegroup_{key}_requested"] = rate * share
    row.update(kind=kind, guidance_scale=scale)
    return row


def score(row):
    return row["formula_match_requested"] if row["kind"] == "formula" else row["spacegroup_match_requested"]


def choose(rows, n_rows):
    """Per kind: the smallest scale whose score is within one standard error of the best score."""
    chosen = {}
    for kind in dict.fromkeys(r["kind"] for r in rows):
        mine = [r for r in rows if r["kind"] == kind]
        best = max(score(r) for r in mine)
        margin = max(np.sqrt(best * (1 - best) / n_rows), 1 / n_rows)  # binomial error, at least one row
        chosen[kind] = min(r["guidance_scale"] for r in mine if score(r) >= best - margin - 1e-9)
    return chosen


def load(model, threads):
    """A model folder, or a training checkpoint (``<run>/checkpoints/step-*``, which has no card)."""
    from ase_crystal_llm.model.loading import STATE_NAME, load_checkpoint

    if model and (Path(model) / STATE_NAME).exists():
        net, tokenizer, _ = load_checkpoint(model)
        return CrystalGenerator(net, tokenizer, model_dir=model, threads=threads)
    return CrystalGenerator.from_pretrained(model, device="cpu", threads=threads)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None,
                   help="model folder or training checkpoint (default: the shipped default model)")
    p.add_argument("-n", type=int, default=100, help="validation rows per (kind, scale) (default %(default)s)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    p.add_argument("--kinds", nargs="+", choices=["formula", "spacegroup"], default=["formula", "spacegroup"])
    p.add_argument("--seed", type=int, default=1, help="sampling seed, the same for every scale (default 1)")
    p.add_argument("--no-guards", action="store_true", help="decode without the spacing and charge guards")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the card's)")
    p.add_argument("--top-p", type=float, help="nucleus top-p (default: the card's)")
    p.add_argument("--coordinate-temperature", type=float,
                   help="temperature of the fractional coordinates (default: --temperature when given, else the "
                        "card's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default=None, help="data folder (default: settings.data_dir())")
    p.add_argument("-o", "--output", default=str(RESULTS / "tune_guidance.json"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    data = Path(args.data) if args.data else settings.data_dir()
    formulas, groups = val_rows(data / "mp_20" / "val.csv.gz", args.n)
    gen = load(args.model, args.threads)
    out = Path(args.output)
    setup = {"model": str(gen.model_dir), "n": args.n, "seed": args.seed, "symprec": SYMPREC,
             "guards": not args.no_guards}
    sampling = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p),
                                  ("coordinate_temperature", args.coordinate_temperature)) if v is not None}
    setup.update(sampling)
    old = json.loads(out.read_text()) if out.exists() else {}
    rows = old.get("rows", []) if old.get("setup") == setup else []
    for kind in args.kinds:
        for scale in args.scales:
            if any(r["kind"] == kind and r["guidance_scale"] == scale for r in rows):
                continue
            rows.append(measure(gen, kind, scale, formulas, groups, args.seed, guards=not args.no_guards, **sampling))
            r = rows[-1]
            print(f"{kind} scale {scale}: score {score(r):.2f}, formula {r['formula_match_requested']:.2f}, "
                  f"returned {r['returned']}/{r['requested']}, valid over outputs "
                  f"{r['validity_attempts']['valid']}, {r['wall_seconds']:.0f} s", flush=True)
            result = {**report_header("tune_guidance", argv), "setup": setup,
                      "sampling": getattr(gen.card, "sampling", None), "rows": rows,
                      "chosen": choose(rows, args.n)}
            atomic_write(out, json.dumps(result, indent=1, default=str))
    print("chosen:", choose(rows, args.n) if rows else None)


if __name__ == "__main__":
    main()
