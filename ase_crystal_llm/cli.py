"""The ``crystal-llm`` command line.

Each subcommand is a parser function (``_add_<name>``) and a thin handler
(``_run_<name>``) that calls the library.  Heavy imports happen inside the
handlers so that ``crystal-llm --help`` stays fast.  Any error reaching
:func:`main` becomes one line on stderr and exit status 2; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ase_crystal_llm import __version__, settings
from ase_crystal_llm.evaluation.options import EvaluationOptions
from ase_crystal_llm.evaluation.options import coverage_size as coverage_size  # argparse type, still importable here
from ase_crystal_llm.ga.options import SearchOptions
from ase_crystal_llm.generation.options import GenerationOptions
from ase_crystal_llm.generation.options import spacegroups as spacegroups  # argparse types, still importable here
from ase_crystal_llm.model.config import TrainConfig, TrainRunOptions
from ase_crystal_llm.options import (
    add_dataclass_arguments,
    options_from_args,
    positive_int,
)
from ase_crystal_llm.options import non_negative_float as non_negative_float

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "build_parser", "main",
]


EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line."""


def output_file(text):
    """argparse type: a file path whose folder exists (checked before any work starts)."""
    from pathlib import Path

    folder = Path(text).expanduser().parent
    if "://" not in text and not folder.is_dir():
        raise argparse.ArgumentTypeError(f"output folder does not exist: {folder}")
    return text


def _add_train(sub):
    p = sub.add_parser("train", help="fine-tune a causal LM (LoRA/QLoRA) or train one from scratch on crystal text")
    add_dataclass_arguments(p, TrainRunOptions)
    add_dataclass_arguments(p, TrainConfig)
    _add_threads(p)


THREADS_HELP = (f"torch CPU threads (default: 1 to decode with a model under "
                f"{settings.SMALL_MODEL_PARAMETERS / 1e6:g} M parameters, else one per idle "
                "core: the cores minus the load average)")


def _add_threads(p):
    p.add_argument("--threads", type=positive_int, help=THREADS_HELP)


def _set_threads(args):
    """The process-wide torch threads for commands that run no language model."""
    import torch

    from ase_crystal_llm import settings

    torch.set_num_threads(args.threads or settings.default_threads())


def _quiet_libraries():
    """Keep stderr for our progress bars and errors.

    On CPUs with AVX512-BF16, importing bitsandbytes (peft imports it) tries to fetch a CPU
    kernel from the Hugging Face Hub and, offline, logs two warnings (bitsandbytes' and the
    ``kernels`` package's); it falls back to its own kernels either way.
    """
    import logging

    for name in ("bitsandbytes.backends.cpu.ops", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _quiet_training_libraries():
    """transformers shows bars while saving and loading weights: training has its own."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _run_train(args):
    _set_threads(args)
    _quiet_training_libraries()
    from accelerate import PartialState

    from ase_crystal_llm.model.training import train

    card = train(**options_from_args(args, TrainRunOptions), **options_from_args(args, TrainConfig))
    # train's Accelerator set up the process state (torchrun / accelerate launch): this only reads it
    if PartialState().is_main_process:  # one message, from the main process
        losses = ", ".join(f"{k} {v:.4f}" for k, v in card.final_losses.items() if isinstance(v, float))
        print(f"model written to {args.out} ({losses})")


def _add_generate(sub):
    p = sub.add_parser("generate", help="sample crystals from a trained model")
    p.add_argument("-n", type=positive_int, required=True, help="number of crystals")
    p.add_argument("-o", "--output", required=True, type=output_file,
                   help="output file: .extxyz, .cif, .traj, .db or .crystxt")
    p.add_argument("--model", help="model directory written by 'crystal-llm train', or a shipped model: default, "
                   "smollm2 (default: default)")
    p.add_argument("--base", help="location of the base model when an adapter moved to another machine")
    # Unset options stay None: the library applies its defaults, and they stay out of the run record.
    add_dataclass_arguments(p, GenerationOptions, use_defaults=False)
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: keep OUTPUT and add only the crystals it lacks")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (refused otherwise)")
    _add_threads(p)


def _generation_options(args):
    """The generation options given on the command line, as :func:`generate_to_file` takes them."""
    options = {k: v for k, v in options_from_args(args, GenerationOptions).items() if v is not None}
    # A guard is passed only when turned off: the run record that --resume compares keeps its keys.
    for guard in ("spacing_guard", "charge_guard"):
        if options[guard]:
            del options[guard]
    if "," in options.get("formula", ""):
        options["formula"] = options["formula"].split(",")
    if len(options.get("spacegroup", ())) == 1:
        options["spacegroup"] = options["spacegroup"][0]
    elements = options.pop("elements", None)
    if elements:
        options["elements"] = [e.strip() for e in elements.split(",") if e.strip()]
    return options


def _run_generate(args):
    from ase_crystal_llm.generation.workflow import generate_to_file

    summary = generate_to_file(
        args.output, args.n, model=args.model, base=args.base, device=args.device, resume=args.resume,
        overwrite=args.overwrite, progress=True, threads=args.threads, **_generation_options(args),
    )
    if summary is not None:
        print(summary, file=sys.stderr)


def _add_evaluate(sub):
    p = sub.add_parser("evaluate",
                       help="relax samples with an ML potential and report validity, coverage, novelty and stability")
    p.add_argument("samples", help="structures to evaluate (any format ase.io reads, or .db)")
    p.add_argument("-o", "--output", required=True, help="report directory (metrics.json, report.md, plots)")
    add_dataclass_arguments(p, EvaluationOptions)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the report in OUTPUT if it holds one (its relaxation cache is reused)")
    _add_threads(p)


def _run_evaluate(args):
    from pathlib import Path

    from ase_crystal_llm.evaluation.pipeline import evaluate

    if (Path(args.output) / "metrics.json").exists() and not args.overwrite:
        raise UsageError(f"{args.output} already holds a report: pass --overwrite to replace it "
                         "(finished relaxations are reused from its cache)")

    result = evaluate(args.samples, args.output, threads=args.threads, **options_from_args(args, EvaluationOptions))
    valid = result["validity"]["returned"]["valid"]
    meta = result["stability"]["metastable"]
    print(f"{result['samples']['n']} samples: {100 * valid:.1f}% valid, "
          f"{100 * meta:.1f}% metastable; report in {args.output}/report.md")


def _add_mutate(sub):
    p = sub.add_parser("mutate", help="LLM-guided (or template) element substitution of structures")
    p.add_argument("input", help="parent structures: CSV(.gz) with a cif column, ase.db, or any ase.io file/glob")
    p.add_argument("-n", type=positive_int, required=True, help="number of children (parents are used in turn)")
    p.add_argument("-o", "--output", required=True, type=output_file,
                   help="output file: .extxyz, .cif, .traj, .db or .crystxt")
    p.add_argument("--model", help="model directory, or a shipped model: default, smollm2 (default: default)")
    p.add_argument("--base", help="location of the base model when an adapter moved to another machine")
    p.add_argument("--temperature", type=float,
                   help="softmax temperature of the model's proposal; 0 is greedy (default 1.0)")
    p.add_argument("--baseline", action="store_true", help="use the template (ionic radius) swap instead of the model")
    p.add_argument("--any-element", action="store_true",
                   help="let the model choose among all elements, not only the chemically alike substitutes")
    p.add_argument("--tolerance", type=float, default=0.1,
                   help="ionic radius tolerance for alike substitutes, A "
                   "(default 0.1, the paper's; see docs/infill.md)")
    p.add_argument("--relax", metavar="POTENTIAL",
                   help="relax each child with this potential (m3gnet, chgnet, sevennet, sevennet-l3i5)")
    p.add_argument("--device", help="torch device for the model and potential (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, help="random seed of the swaps (default: a fresh one)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (refused otherwise)")
    _add_threads(p)


def _run_mutate(args):
    import numpy as np

    from ase_crystal_llm.data.datasets import read_structures
    from ase_crystal_llm.ga.operators import LLMElementMutation, TemplateElementMutation, mutate_structures
    from ase_crystal_llm.io.outputs import StructureWriter, check_output, output_format

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
        from ase_crystal_llm.generation.generator import CrystalGenerator

        generator = CrystalGenerator.from_pretrained(args.model, device=args.device, base=args.base,
                                                     threads=args.threads)
        temperature = 1.0 if args.temperature is None else args.temperature
        operator = LLMElementMutation(generator, temperature=temperature, tolerance=args.tolerance,
                                      restrict_to_template=not args.any_element, rng=rng)
    calculator = None
    if args.relax:
        from ase_crystal_llm.evaluation.potentials import get_calculator
        from ase_crystal_llm.evaluation.relaxation import relax

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


def _add_search(sub):
    p = sub.add_parser("search", help="genetic-algorithm search for stable crystals (ase_ga) with the LLM operator")
    p.add_argument("start", nargs="*",
                   help="starting structures: files (any ase.io format, .db, CSV with a cif column) or MP-20 "
                        "formulas and chemical systems (SrTiO3, Sr-Ti-O); none when continuing with --resume")
    p.add_argument("-o", "--output", required=True, type=output_file, metavar="SEARCH",
                   help="the search's ase_ga database: a .db file or a postgresql:// address")
    p.add_argument("--budget", type=positive_int, required=True,
                   help="relaxations in the whole search, starting structures included")
    p.add_argument("--resume", action="store_true",
                   help="continue the search in SEARCH to the new budget (or start it if it does not exist: "
                        "every worker of a shared search is started this way)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing SEARCH file first")
    add_dataclass_arguments(p, SearchOptions, use_defaults=False)  # --resume keeps the search's own
    _add_threads(p)


def _run_search(args):
    from pathlib import Path

    from ase_crystal_llm.ga.search import run_search
    from ase_crystal_llm.io.outputs import is_db_url

    url = is_db_url(args.output)
    if not url and Path(args.output).suffix.lower() != ".db":
        raise UsageError(f"the search database must be a .db file or a postgresql:// address, got {args.output}")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues SEARCH and --overwrite deletes it: choose one")
    if args.overwrite and url:
        raise UsageError("--overwrite deletes files only: drop the server database yourself")
    if not url and Path(args.output).exists() and not (args.resume or args.overwrite):
        raise UsageError(f"{args.output} exists: pass --resume to continue it or --overwrite to start again")
    if not args.start and not args.resume:
        raise UsageError("no starting structures: give files, formulas or chemical systems")
    _set_threads(args)
    summary = run_search(args.start or None, args.output, args.budget, resume=args.resume,
                         overwrite=args.overwrite, threads=args.threads, **options_from_args(args, SearchOptions))
    _print_search_summary(summary, args)


def _print_search_summary(summary, args):
    from ase_crystal_llm.evaluation.metrics import NoveltyIndex
    from ase_crystal_llm.ga.search import search_results, summarize

    novelty = NoveltyIndex.from_csv([settings.mp20_path(s, settings.data_dir(args.data_dir)) for s in ("train", "val")])
    stopped = summary["stopped"]
    summary = summarize(search_results(args.output), novelty)
    ops = ", ".join(f"{k} {v}" for k, v in summary["by_operator"].items() if k != "start")
    print(f"{summary['relaxations']} relaxations ({summary['failed']} failed), {summary['children']} children"
          + (f" ({ops})" if ops else ""))
    for key, label in (("stable", "on or below the hull"), ("below_0.1", "below 0.1 eV/atom")):
        found = summary["found"][key]
        print(f"{label}: {found['children']} children, {found['distinct']} distinct, "
              f"{found['distinct_novel']} distinct and novel (not in MP-20 train+val)")
    t = summary["time"]
    print(f"time: proposals {t['propose_seconds']:.0f} s, relaxations and hull {t['relax_seconds']:.0f} s")
    if summary["best"]:
        print(f"\n{'id':>5}  {'formula':<14} {'E_hull (eV/atom)':>16}  {'operator':<11} novel")
        for row in summary["best"]:
            novel = {True: "yes", False: "no"}.get(row.get("novel"), "")
            print(f"{row['gaid']:>5}  {row['formula']:<14} {row['e_above_hull']:>16.3f}  {row['operator']:<11} {novel}")
    if stopped:
        print(f"stopped early: {stopped}", file=sys.stderr)
    print(f"\nall candidates: ase db {args.output} relaxed=1 -s raw_score-")


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
    from pathlib import Path

    from ase_crystal_llm.model.loading import merge_adapter

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
    p.add_argument("--order-disordered", action="store_true",
                   help="give partially occupied sites their majority occupant instead of failing")
    p.add_argument("--limit", type=positive_int, help="convert only the first N structures")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (refused otherwise)")


def _output_format(path):
    from ase.io.formats import filetype, ioformats

    fmt = filetype(str(path), read=False)
    if fmt not in ioformats or not ioformats[fmt].can_write:
        raise UsageError(f"cannot write {path}: unknown or read-only output format {fmt!r}")
    return fmt


def _write_atomically(path, images, fmt):
    """Write all of ``images`` to ``path`` or nothing: no half-written outputs."""
    import io
    import os
    from pathlib import Path

    import ase.io
    from ase.io.formats import ioformats

    from ase_crystal_llm.io.files import atomic_write

    # ase writes some formats by path: .traj (ulm seeks back into its file and writes arrays with tofile,
    # which needs a real file) and ase.db's .db and .json (it connects to the file by name).
    by_path = fmt in ("traj", "db", "json") or not ioformats[fmt].acceptsfd
    if not by_path:  # text or bytes: rendered in memory, then one atomic write
        buffer = io.BytesIO() if ioformats[fmt].isbinary else io.StringIO()
        ase.io.write(buffer, images, format=fmt)
        atomic_write(path, buffer.getvalue())
        return
    # The rest: a temporary name beside ``path`` that keeps its extension (ase.db picks its backend
    # from the name), then rename.
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        ase.io.write(str(tmp), images, format=fmt)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _run_convert(args):
    import time
    import warnings

    from ase_crystal_llm.data.datasets import read_structures
    from ase_crystal_llm.io.outputs import check_output, is_cif_archive, write_cif_archive

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
                      help="symbolic link to create (default: $CRYSTAL_LLM_CACHE/data or "
                      "~/.cache/ase-crystal-llm/data)")
    for action in actions.choices.values():  # build_parser adds --debug to the top level only
        action.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def _run_data(args):
    from pathlib import Path

    from ase_crystal_llm import settings
    from ase_crystal_llm.data import download as data

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
    "search": (_add_search, _run_search),
    "merge": (_add_merge, _run_merge),
    "convert": (_add_convert, _run_convert),
    "data": (_add_data, _run_data),
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2) instead of usage dumps."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version and usage errors: a status, not an exception
        return done.code
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    run = COMMANDS[args.command][1]
    _quiet_libraries()
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
