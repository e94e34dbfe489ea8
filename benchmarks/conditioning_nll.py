"""Does a model read the formula (or space group) in its prompt?  Compare answer likelihoods.

    nice python benchmarks/conditioning_nll.py                    # the shipped model, 200 val crystals
    nice python benchmarks/conditioning_nll.py --model DIR -n 50
    nice python benchmarks/conditioning_nll.py --model smollm2 --vary spacegroup --keep-formula

For ``-n`` crystals of the MP-20 *validation* split (the first ``-n``, canonical
cells as in training, untranslated text) the script scores the crystal text as
the answer to three generation prompts:

* ``own``: the crystal's own formula (the condition sentence of training);
* ``other``: the formula of another crystal of the sample (a fixed derangement);
* ``none``: no condition.

With ``--vary spacegroup`` the three prompts differ in the space-group sentence
instead (own, another crystal's, none); ``--keep-formula`` then states the
crystal's own formula in all three, as a formula + space-group request does, so
the difference is what the space group adds beyond the formula.

It writes the summed negative log-likelihood (nats) of the answer tokens under
each prompt and how often the own condition gives the lowest NLL.  A model that
ignores its conditions gives the same numbers for all three; one that reads
them gives ``own`` < ``none`` < ``other``.  Results:
``benchmarks/results/conditioning_nll.json`` (or ``--output``).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report_header  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory or shipped name (default: the shipped default)")
    p.add_argument("-n", type=int, default=200, help="validation crystals (default 200)")
    p.add_argument("--data", help="MP-20 directory (default $CRYSTAL_LLM_DATA or ../shared/data)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vary", choices=("formula", "spacegroup"), default="formula",
                   help="the condition whose value differs between the prompts (default formula)")
    p.add_argument("--keep-formula", action="store_true",
                   help="with --vary spacegroup: state the crystal's own formula in every prompt")
    p.add_argument("--output", default=str(Path(__file__).parent / "results" / "conditioning_nll.json"))
    args = p.parse_args(argv)
    if args.keep_formula and args.vary != "spacegroup":
        p.error("--keep-formula goes with --vary spacegroup")

    import torch
    from transformers.utils import logging as hf_logging

    from ase_crystal_llm import settings
    from ase_crystal_llm.data.datasets import read_structures
    from ase_crystal_llm.model.scoring import answer_nll
    from ase_crystal_llm.text.format import atoms_to_text

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    model_dir = settings.model_folder(args.model)
    model, tokenizer, template, about = _load(model_dir)
    crystals = read_structures(str(settings.mp20_path("val", args.data)), limit=args.n)
    answers = [atoms_to_text(a) for a in crystals]
    prompts = _prompts(template, crystals, args.vary, args.keep_formula)
    nll = {k: answer_nll(model, tokenizer, p, answers, batch_size=16)[0] for k, p in prompts.items()}
    result = {
        **report_header("conditioning_nll", argv),
        "model": str(model_dir),
        "model_about": about,
        "varied": args.vary,
        "formula_in_every_prompt": args.keep_formula,
        "n": len(crystals),
        "summed_nll_nats": {k: float(v.sum()) for k, v in nll.items()},
        "mean_nll_per_crystal": {k: float(v.mean()) for k, v in nll.items()},
        "own_lowest_fraction": float(np.mean((nll["own"] < nll["other"]) & (nll["own"] < nll["none"]))),
        "own_below_other_fraction": float(np.mean(nll["own"] < nll["other"])),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("n", "summed_nll_nats", "own_lowest_fraction")}, indent=1))


def _prompts(template, crystals, vary, keep_formula):
    """The ``own`` / ``other`` / ``none`` generation prompts of each crystal."""
    formulas = [str(a.info["pretty_formula"]) for a in crystals]  # the training condition
    if vary == "formula":
        values, base = formulas, [{} for _ in crystals]
    else:
        values = [int(a.info["spacegroup_number"]) for a in crystals]
        base = [{"formula": f} if keep_formula else {} for f in formulas]
    # A derangement that never pairs two crystals of the same value.
    other = [values[(i + 1 + k) % len(values)] for i, k in enumerate(_shift(values))]
    return {
        "own": [template.generation_prompt({**b, vary: v}) for b, v in zip(base, values)],
        "other": [template.generation_prompt({**b, vary: v}) for b, v in zip(base, other)],
        "none": [template.generation_prompt(b) for b in base],
    }


def _load(model_dir):
    """Model, tokenizer, prompt template and a note on the model; also takes a training checkpoint."""
    from ase_crystal_llm.model.loading import STATE_NAME, load_trained
    from ase_crystal_llm.model.modelcard import CARD_NAME
    from ase_crystal_llm.text.prompts import PromptTemplate

    if (model_dir / CARD_NAME).is_file():
        model, tokenizer, card = load_trained(model_dir)
        return model, tokenizer, card.template, {"base_model": card.base_model, "final_losses": card.final_losses}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A checkpoint of a run in progress has no card: the default prompts, step from its state.
    state = json.loads((model_dir / STATE_NAME).read_text())
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return model, AutoTokenizer.from_pretrained(model_dir), PromptTemplate(), {"checkpoint_step": state["step"]}


def _shift(values):
    """Per crystal, the extra offset that skips partners with the same value."""
    n = len(values)
    shifts = []
    for i, f in enumerate(values):
        k = 0
        while k < n - 1 and values[(i + 1 + k) % n] == f:
            k += 1
        shifts.append(k)
    return shifts


if __name__ == "__main__":
    main()
