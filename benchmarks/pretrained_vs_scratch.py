"""A pretrained LLM + LoRA against a model trained from scratch: validation NLL per crystal against crystals seen.

The paper's Appendix A.5 at our scale.  Each ``--run NAME=DIR`` is a training
run directory (``crystal-llm train ... --keep-checkpoints 0``); every
checkpoint is loaded (:func:`ase_crystal_llm.training.load_checkpoint`) and
scored on the first ``-n`` MP-20 validation crystals (canonical cells,
untranslated text, the unconditioned generation prompt): the summed NLL of the
answer tokens and EOS, in nats per crystal, which does not depend on the
tokenizer.  With ``--match K`` each checkpoint also writes crystals for the
formulas, and for the formulas and space groups together, of K validation crystals, the model alone (no
formula constraint, no guards, one draw each), and reports how many match
(reduced formula; ``SpacegroupAnalyzer`` at symprec 0.1).  The shipped default
model is scored the same way as a reference line.

    python benchmarks/pretrained_vs_scratch.py \\
        --run smollm2-135m+lora=runs/smollm2-lora --run medium-from-scratch=runs/medium-scratch -n 100 --match 20

Results: ``benchmarks/results/pretrained_vs_scratch.json`` and a plot beside it
(``--output``).  Points already in the results file (same run, step, ``-n`` and
``--match``) are kept, so the script can follow runs that are still training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report_header  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TRAIN_SIZE = 27_136  # MP-20 train crystals: epochs = crystals seen / this


def per_crystal_nll(model, tokenizer, template, crystals, batch_size=8):
    from ase_crystal_llm.model.scoring import answer_nll
    from ase_crystal_llm.text.format import atoms_to_text

    prompt = template.generation_prompt({})
    nll, _ = answer_nll(model, tokenizer, [prompt] * len(crystals), [atoms_to_text(a) for a in crystals],
                        batch_size=batch_size)
    return float(np.mean(nll)), float(np.std(nll) / np.sqrt(len(nll)))


def condition_matches(generator, crystals, seed=0):
    """Model-alone formula and space-group match over the crystals' own conditions."""
    from pymatgen.core import Composition
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    alone = dict(constrain_formula=False, spacing_guard=False, charge_guard=False, min_distance=None,
                 max_attempts=1, seed=seed)
    formulas = [a.get_chemical_formula(mode="metal", empirical=True) for a in crystals]
    made = generator.generate(len(formulas), formula=formulas, **alone)
    formula_hits = sum(Composition(a.get_chemical_formula()).reduced_formula
                       == Composition(a.info["condition_formula"]).reduced_formula for a in made)
    # Training always writes the formula before the space group: ask for both, as the recorded evaluation does.
    groups = [int(a.info["spacegroup_number"]) for a in crystals]
    made = generator.generate(len(groups), formula=formulas, spacegroup=groups, **alone)
    group_hits = 0
    for atoms in made:
        try:
            found = SpacegroupAnalyzer(AseAtomsAdaptor.get_structure(atoms), symprec=0.1).get_space_group_number()
        except Exception:  # noqa: BLE001 - spglib fails on some sampled cells: no match
            continue
        group_hits += found == int(atoms.info["condition_spacegroup"])
    return {"formula_match": formula_hits / len(formulas), "spacegroup_match": group_hits / len(groups),
            "requested": len(formulas)}


def score(model, tokenizer, crystals, match):
    from ase_crystal_llm.generation.generator import CrystalGenerator
    from ase_crystal_llm.text.prompts import PromptTemplate

    mean, sem = per_crystal_nll(model, tokenizer, PromptTemplate(), crystals)
    point = {"val_nll_per_crystal": mean, "val_nll_sem": sem}
    if match:
        point.update(condition_matches(CrystalGenerator(model, tokenizer), crystals[:match]))
    return point


def crystals_seen(state):
    """Crystals trained on at a checkpoint, those of the adapter it continues (``--adapter``) included."""
    fp = state["fingerprint"]
    seen = int(state["step"]) * int(fp["batch_size"]) * int(fp.get("world_size") or 1) * int(fp.get("grad_accum") or 1)
    if fp.get("adapter"):
        from ase_crystal_llm import settings
        from ase_crystal_llm.model.modelcard import ModelCard

        start = ModelCard.from_pretrained(settings.model_folder(fp["adapter"]))
        seen += int(start.final_losses["steps"]) * int(start.hyperparameters["global_batch_size"])
    return seen


def follow_run(name, run_dir, crystals, match, done, every=1, saved=None, device="cpu"):
    """Score each checkpoint of a run (steps that are multiples of ``every``; kept points reused);
    ``saved(points)`` after each new one, so an interrupt keeps what was scored."""
    from ase_crystal_llm.model.loading import checkpoints, load_base_model, load_checkpoint

    points, base_model = [], None
    for ckpt in checkpoints(run_dir):
        step = int(ckpt.name.split("-")[1])
        if step in done:
            points.append(done[step])
            continue
        if step % every:
            continue
        if base_model is None:  # once per run: a LoRA checkpoint merges into a copy of it
            fingerprint = json.loads((ckpt / "trainer_state.json").read_text())["fingerprint"]
            if not (fingerprint.get("from_scratch") or fingerprint.get("full")):
                base_model = load_base_model(fingerprint["base"], device="cpu")
        model, tokenizer, state = load_checkpoint(ckpt, device=device, base_model=base_model)
        seen = crystals_seen(state)
        point = {"step": step, "crystals_seen": seen, "epochs": seen / TRAIN_SIZE,
                 "train_loss_per_token": state["log"]["steps"][-1]["loss"], **score(model, tokenizer, crystals, match)}
        print(f"{name} step {step}: {point['epochs']:.4f} epochs, {point['val_nll_per_crystal']:.1f} nats/crystal",
              flush=True)
        points.append(point)
        if saved is not None:
            saved(points)
    return points


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in result["runs"].items():
        pts = [p for p in run["points"] if p["epochs"] > 0]
        ax.errorbar([p["epochs"] for p in pts], [p["val_nll_per_crystal"] for p in pts],
                    yerr=[p["val_nll_sem"] for p in pts], marker="o", label=name)
    ref = result.get("reference")
    if ref:
        ax.axhline(ref["val_nll_per_crystal"], color="grey", linestyle="--", label=ref["label"])
    ax.set_xscale("log")
    ax.set_xlabel("epochs of MP-20 train (crystals seen / 27,136)")
    ax.set_ylabel("validation NLL (nats per crystal)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", default=[], metavar="NAME=DIR", help="a training run directory")
    p.add_argument("-n", type=int, default=100, help="validation crystals for the NLL (default 100)")
    p.add_argument("--match", type=int, default=0,
                   help="validation rows for formula / space-group match (default 0: skip)")
    p.add_argument("--no-reference", action="store_true", help="do not score the shipped default model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="torch device of the scoring (default cpu)")
    p.add_argument("--val-file", help="validation crystals, canonical cells, any format crystal-llm reads "
                   "(default: MP-20 val from the data directory)")
    p.add_argument("--every", type=int, default=1, help="score only checkpoints whose step is a multiple of this")
    p.add_argument("--output", default=str(Path(__file__).parent / "results" / "pretrained_vs_scratch.json"))
    args = p.parse_args(argv)

    import torch

    from ase_crystal_llm import settings
    from ase_crystal_llm.data.datasets import read_structures

    torch.set_num_threads(args.threads)
    out = Path(args.output)
    old = json.loads(out.read_text()) if out.exists() else {}
    same = old.get("n_val") == args.n and old.get("match_rows") == args.match
    crystals = (read_structures(args.val_file, canonical=False, limit=args.n) if args.val_file
                else read_structures(settings.mp20_path("val"), limit=args.n))
    result = {**report_header("pretrained_vs_scratch", argv), "n_val": args.n, "match_rows": args.match, "runs": {}}
    for spec in args.run:
        name, _, run_dir = spec.partition("=")
        done = {q["step"]: q for q in old.get("runs", {}).get(name, {}).get("points", [])} if same else {}
        state = json.loads(sorted(Path(run_dir, "checkpoints").glob("step-*/trainer_state.json"))[-1].read_text())
        # Runs are scored on different machines (a GPU lease, a CPU session): each records its own.
        entry = result["runs"][name] = {
            "run_dir": str(run_dir), "settings": state["fingerprint"], "hardware": result["hardware"],
            "date": result["date"], "command": result["command"],
            "points": sorted(done.values(), key=lambda q: q["step"]),
        }

        def saved(points, entry=entry):  # partial results survive an interrupt; other runs' old points kept
            entry["points"] = points
            kept = old if same else {}
            out.write_text(json.dumps({**kept, **result, "runs": {**kept.get("runs", {}), **result["runs"]}},
                                      indent=1) + "\n")

        out.parent.mkdir(parents=True, exist_ok=True)
        saved(follow_run(name, run_dir, crystals, args.match, done, every=args.every, saved=saved, device=args.device))
    if not args.no_reference:
        from ase_crystal_llm.generation.generator import CrystalGenerator

        gen = CrystalGenerator.from_pretrained(device="cpu")
        steps = sum(s["final_losses"].get("steps") or 0 for s in gen.card.extra.get("training_stages", [])) or None
        result["reference"] = {"label": "shipped default (medium, from scratch, final)", "steps": steps,
                               **(old.get("reference") if same and old.get("reference") else
                                  score(gen.model, gen.tokenizer, crystals, args.match))}
    kept = old if same else {}  # runs and reference scored before and not named this time stay
    result = {**kept, **result, "runs": {**kept.get("runs", {}), **result["runs"]}}
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"results in {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
