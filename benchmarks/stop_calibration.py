"""Does the model end crystals when real crystals end?  Teacher-forced stop probabilities and unguarded draws.

Two measurements of where a model's small cells come from:

* **Stop calibration.**  Real MP-20 val crystals (canonical cells, written with
  the training's grid translation) are scored under the unconditioned
  generation prompt.  After the k-th atom the text either ends (EOS) or goes
  on; a calibrated model's mean P(EOS) over the crystals with at least k atoms
  equals the share of them that have exactly k (the empirical hazard).  The
  product of (1 - hazard) gives the mean cell size each set of hazards implies.
* **Infill** (``--infill N``): the masked-element recovery of ``mutation.py`` on
  N val crystals, to see what a change of the loss weighting costs the other task.
* **Training batches** (``--train-batches B``): answer tokens per length-bucketed
  batch of B in one epoch of MP-20 train with the model's tokenizer, the counts a
  step's loss was once divided by (``--loss-normaliser batch``).
* **What validity selects.**  Unguarded samples (no spacing or charge guard, no
  distance floor: every parseable draw is kept) split into structurally valid
  and invalid ones: if the invalid ones are the large cells, re-sampling them
  shrinks the returned cells further.

Usage::

    python benchmarks/stop_calibration.py --model default --out benchmarks/results/stop_calibration.json
    python benchmarks/stop_calibration.py --model runs/stage5 -n 300 --samples 300
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from common import report_header  # noqa: E402

from ase_crystal_llm import settings
from ase_crystal_llm.chemistry.validity import structure_valid
from ase_crystal_llm.data.datasets import read_structures
from ase_crystal_llm.generation.generator import CrystalGenerator
from ase_crystal_llm.io.files import atomic_write
from ase_crystal_llm.model.encoding import encode_example
from ase_crystal_llm.text.format import atoms_to_text

SIZE_BINS = ((1, 4), (5, 8), (9, 12), (13, 20), (21, 1000))


def stop_probabilities(gen, crystal, rng):
    """P(EOS) after each atom of one crystal's training text, teacher-forced."""
    import torch

    tok, prompt = gen.tokenizer, gen.template.generation_prompt(None)
    text = atoms_to_text(crystal, translate=True, rng=rng)
    lines = text.split("\n")  # lengths, angles, then symbol and coordinates per atom
    ids, n_prompt = encode_example(tok, prompt, text)
    with torch.no_grad():
        logits = gen.model(input_ids=torch.as_tensor(ids, device=gen.device)[None]).logits[0].float()
    p_end = torch.softmax(logits, -1)[:, tok.eos_token_id].cpu().numpy()
    ends = [n_prompt + len(tok("\n".join(lines[: 2 + 2 * k]), add_special_tokens=False).input_ids)
            for k in range(1, len(crystal) + 1)]  # fmt: skip
    return [float(p_end[e - 1]) for e in ends]


def implied_mean_size(hazards):
    """Mean atoms per cell of a length distribution with these hazards (k = 1, 2, ...)."""
    alive, mean = 1.0, 0.0
    for k, h in enumerate(hazards, start=1):
        mean += k * alive * h
        alive *= 1.0 - h
    return mean + len(hazards) * alive  # what survives the last k ends there


def calibration(gen, crystals, seed):
    rng = np.random.default_rng(seed)
    per_k = {}
    for crystal in crystals:
        for k, p in enumerate(stop_probabilities(gen, crystal, rng), start=1):
            per_k.setdefault(k, []).append(p)
    sizes = np.array([len(a) for a in crystals])
    rows = []
    for k in sorted(per_k):
        at_risk = int(np.sum(sizes >= k))
        rows.append({"k": k, "at_risk": at_risk, "real_hazard": float(np.sum(sizes == k) / at_risk),
                     "model_p_end": float(np.mean(per_k[k]))})  # fmt: skip
    return {
        "rows": rows,
        "implied_mean_atoms": {"real": implied_mean_size([r["real_hazard"] for r in rows]),
                               "model": implied_mean_size([r["model_p_end"] for r in rows])},  # fmt: skip
        "mean_atoms_real": float(sizes.mean()),
    }


def size_mix(sizes):
    sizes = np.asarray(sizes)
    return {"n": int(len(sizes)), "mean_atoms": float(sizes.mean()) if len(sizes) else None,
            **{f"share_{lo}_{hi}": float(np.mean((sizes >= lo) & (sizes <= hi))) if len(sizes) else None
               for lo, hi in SIZE_BINS}}  # fmt: skip


def unguarded_draws(gen, n, seed):
    samples = gen.generate(n, seed=seed, min_distance=0.0, covalent_ratio=0.0, spacing_guard=False,
                           charge_guard=False, max_attempts=1)  # fmt: skip
    valid = np.array([structure_valid(a) for a in samples], dtype=bool)
    sizes = np.array([len(a) for a in samples])
    return {
        "parsed": len(samples),
        "requested": n,
        "all": size_mix(sizes),
        "structurally_valid": size_mix(sizes[valid]),
        "structurally_invalid": size_mix(sizes[~valid]),
        "valid_share_by_size": {f"{lo}_{hi}": float(valid[(sizes >= lo) & (sizes <= hi)].mean())
                                for lo, hi in SIZE_BINS if np.any((sizes >= lo) & (sizes <= hi))},  # fmt: skip
    }


def batch_label_counts(gen, batch_size, seed):
    """Answer tokens per batch of one training epoch (seed ``seed``, epoch 0)."""
    from ase_crystal_llm.model.encoding import EpochData, load_training_structures

    structures, _ = load_training_structures(settings.mp20_path("train"))
    data = EpochData(structures, gen.tokenizer, gen.template, seed=seed, epoch=0, batch_size=batch_size,
                     infill_fraction=1 / 3, max_length=None)  # fmt: skip
    counts = data.label_counts("per_token")
    full = counts[[len(b) == batch_size for b in data.batches]]
    return {"batch_size": batch_size, "batches": len(counts), "mean": float(counts.mean()),
            "min_full_batch": float(full.min()), "max": float(counts.max()),
            **{f"p{q}": float(np.percentile(counts, q)) for q in (5, 50, 95)}}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="model directory or shipped name (default: default)")
    parser.add_argument("-n", type=int, default=300, help="first N MP-20 val crystals scored (default 300)")
    parser.add_argument("--samples", type=int, default=300, help="unguarded draws (default 300; 0 skips)")
    parser.add_argument("--infill", type=int, default=0, help="also infill recovery on N val crystals (default 0)")
    parser.add_argument("--train-batches", type=int, default=0, metavar="B",
                        help="also count answer tokens per training batch of B (default 0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "stop_calibration.json"))
    args = parser.parse_args(argv)
    gen = CrystalGenerator.from_pretrained(args.model, threads=args.threads)  # in eval mode
    crystals = read_structures(settings.mp20_path("val"), limit=args.n)
    report = {
        **report_header("stop_calibration", argv),
        "model": args.model,
        "n_val": len(crystals),
        "real_val": size_mix([len(a) for a in crystals]),
        "calibration": calibration(gen, crystals, args.seed),
    }
    if args.samples:
        report["unguarded_draws"] = unguarded_draws(gen, args.samples, args.seed)
    if args.train_batches:
        report["train_batch_answer_tokens"] = batch_label_counts(gen, args.train_batches, args.seed)
    if args.infill:
        from mutation import infill_recovery

        report["infill_recovery"] = infill_recovery(gen, crystals[: args.infill], np.random.default_rng(args.seed))
    atomic_write(args.out, json.dumps(report, indent=2) + "\n")
    implied = report["calibration"]["implied_mean_atoms"]
    print(f"implied mean atoms per cell: real hazards {implied['real']:.2f}, model {implied['model']:.2f}")
    if args.samples:
        d = report["unguarded_draws"]
        parts = [f"{k} {d[k]['mean_atoms']:.2f} (n {d[k]['n']})"
                 for k in ("all", "structurally_valid", "structurally_invalid")]  # fmt: skip
        print("unguarded draws, mean atoms: " + ", ".join(parts))


if __name__ == "__main__":
    main()
