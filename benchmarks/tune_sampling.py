"""Choose the default sampling temperature and top-p on the MP-20 *validation* split.

    nice python benchmarks/tune_sampling.py                      # the shipped model, default grid
    nice python benchmarks/tune_sampling.py --model DIR -n 500 --relax 100
    nice python benchmarks/tune_sampling.py --temperatures 0.7 1.0 --top-p 0.9 -n 8 --n-formulas 4
    nice python benchmarks/tune_sampling.py --model smollm2 --guards --temperatures 1 --top-p 1 \
        --coordinate-temperatures 1 0.5 0.25 0.1

For every (temperature, top-p, and with ``--coordinate-temperatures`` the
temperature of the fractional coordinates) of the grid the model generates ``-n``
unconditional crystals and one crystal for each of ``--n-formulas`` formulas
drawn from the validation split (seed 0), through
``CrystalGenerator.generate`` with its usual re-sampling of output that does
not parse (``max_attempts``).  Every parsed crystal is kept (``min_distance=None``
where ``generate`` has that option, which also turns the spacing guard off, and
``charge_guard=False``; ``--guards`` keeps ``generate``'s own decoding, both guards on), so
validity is measured on what the model itself writes; where ``generate`` can force the asked formula
(``constrain_formula``) the script turns that off, so formula match measures
the model.  All settings use the same seeds.

Per setting, for the unconditional crystals:

* structural and compositional validity (:func:`validity.validity_flags`) over
  the returned crystals and over *all attempts* (outputs that did not parse
  count as invalid; :func:`metrics.emitted_validity` with the run statistics);
* coverage recall and precision (:func:`metrics.coverage`, CDVAE cutoffs)
  against ``--ref-size`` validation crystals, whose fingerprints are computed
  once and cached (:func:`references.reference_fingerprints`); sample
  fingerprints are taken of the valid crystals, and precision is over the
  ``-n`` crystals asked for;
* uniqueness of the valid crystals (:func:`metrics.unique_flags`);
* symmetry of the valid crystals: the share that is P1 at symprec 0.1 (real
  MP-20 crystals written as text: 2%) and the space-group Jensen-Shannon
  distance to the same ``--ref-size`` validation crystals;
* with ``--relax K``: the metastable rate (E_hull < 0.1 eV/atom, M3GNet
  relaxation, MP-20 hull) of the first ``K`` valid crystals, through
  :func:`relaxation.relax_many` and :func:`pipeline.e_above_hull_many` as in
  ``crystal-llm evaluate`` (relaxations cached in the cache folder).

For the formula-conditioned crystals: the same validity figures and the
formula match rate (:func:`metrics.conditional_accuracy`) over the returned
crystals and over the formulas asked for.

Selection rule: the chosen setting maximises

    score = (structural validity over attempts + compositional validity over attempts) / 2
            + coverage recall

of the unconditional crystals: the two ways a sampler fails, invalid output
(usually from sampling too hot) and missing parts of the data distribution
(usually from sampling too cold), weighted equally; both terms lie in [0, 1].  Scores
equal to three decimals (less than one crystal in a few hundred) count as a
tie, broken by the higher coverage precision, then by the lower temperature.
Formula match and the metastable rate are reported but not scored: the
former hardly depends on these settings for a well-trained model, and the
latter, from a handful of relaxations, is too noisy to rank close settings.
It does catch large effects, so check the best settings with ``--relax``
before shipping one: for the small default model the score kept rising with
temperature up to 1.5 while the metastable rate fell from 41% (T = 1.0) to
25% (T = 1.5), and the card keeps T = 1.0 (``docs/model_card.md``).

Results: ``benchmarks/results/tune_sampling.json`` (hardware, date, command,
every row, the chosen setting).  Never run on the test split: the test split
is for the final evaluation of the chosen setting.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from common import report_header  # noqa: E402

from ase_crystal_llm import settings
from ase_crystal_llm.chemistry.validity import validity_flags, validity_rates
from ase_crystal_llm.data import datasets
from ase_crystal_llm.evaluation import metrics, pipeline, references
from ase_crystal_llm.evaluation.distribution import CrystalStatistics, distances, split_statistics
from ase_crystal_llm.generation.generator import CrystalGenerator
from ase_crystal_llm.io.files import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"
TIE_DECIMALS = 3


def val_formulas(path, n, seed=0):
    """``n`` distinct ``pretty_formula`` values of a split, drawn with ``seed`` (sorted first, so reproducible)."""
    formulas = sorted(set(datasets.csv_column(path, "pretty_formula")))
    if n > len(formulas):
        raise ValueError(f"--n-formulas {n} exceeds the {len(formulas)} distinct formulas of {path}")
    picked = np.random.default_rng(seed).choice(len(formulas), size=n, replace=False)
    return [formulas[i] for i in picked]


def generate_kwargs(gen, guards=False):
    """Options of ``gen.generate`` that this script sets when the installed version has them.

    ``guards``: keep ``generate``'s own decoding (spacing and charge guards on,
    too-close crystals re-sampled), to choose the settings users get.
    """
    params = {**inspect.signature(gen.generate).parameters, **inspect.signature(gen.iter_generate).parameters}
    extra = {}
    if "min_distance" in params and not guards:
        extra["min_distance"] = None  # keep every parsed crystal: validity is what we measure
    if "constrain_formula" in params:
        extra["constrain_formula"] = False  # the model, not the grammar, must get the formula right
    if "charge_guard" in params and not guards:
        extra["charge_guard"] = False  # the model, not the decoder, ends each crystal
    return extra


@dataclass
class Reference:
    """The validation crystals samples are compared with: coverage fingerprints and statistics."""

    fingerprints: metrics.Fingerprints
    statistics: CrystalStatistics


def grid(args):
    """Every setting to try: ``generate`` keyword arguments (the coordinate temperature only where given)."""
    for temperature in args.temperatures:
        for top_p in args.top_p:
            for coordinate in args.coordinate_temperatures or [None]:
                extra = {} if coordinate is None else {"coordinate_temperature": coordinate}
                yield {"temperature": temperature, "top_p": top_p, **extra}


def sample(gen, n, *, seed, **kwargs):
    """``gen.generate`` and its statistics, quietly (gave-up warnings are counted in the stats)."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        crystals = gen.generate(n, seed=seed, **kwargs)
    stats = gen.stats.as_dict()
    stats["wall_seconds"] = round(time.perf_counter() - start, 2)
    return crystals, stats


def validity(crystals, stats):
    """Validity over returned crystals and over all attempts; also returns the flags."""
    flags = validity_flags(crystals)
    emitted = (metrics.emitted_validity(crystals, flags, stats) or {}).get("all")
    attempts = {"structure": None, "composition": None, "valid": None}
    if emitted:
        attempts = {"structure": emitted["structure_valid_over_emitted"],
                    "composition": sum(flags["composition"]) / emitted["emitted"],
                    "valid": emitted["valid_over_emitted"]}
    counts = {k: stats.get(k) for k in ("requested", "returned", "attempts", "gave_up", "rejected",
                                         "parse_failures", "wall_seconds")}
    return {**counts, "validity_returned": validity_rates(flags), "validity_attempts": attempts}, flags


def metastable_rate(crystals, k, cache, data):
    """Metastable rate of ``crystals[:k]``: M3GNet relaxation and MP-20 hull, as ``crystal-llm evaluate``."""
    from ase_crystal_llm.evaluation import relaxation
    from ase_crystal_llm.evaluation.hull import ReferenceHull

    chosen = crystals[:k]
    if not chosen:
        return {"n": 0, "metastable": None, "stable": None}
    relaxed = relaxation.relax_many(chosen, "m3gnet", cache=references.cache_dir(cache) / "tune_sampling_relax.db")
    e_hull, errors = pipeline.e_above_hull_many(relaxed, ReferenceHull.from_mp20(data))
    rates = metrics.stability_rates(e_hull)
    return {"n": rates["n"], "metastable": rates["metastable"], "stable": rates["stable"],
            "failures": sum(e is None for e in e_hull)}


def unconditional(gen, args, sampling, ref, extra):
    crystals, stats = sample(gen, args.n, seed=args.seed, **sampling,
                             **{k: v for k, v in extra.items() if k != "constrain_formula"})
    row, flags = validity(crystals, stats)
    valid = [a for a, ok in zip(crystals, flags["valid"]) if ok]
    fps = metrics.Fingerprints.from_structures(valid)
    row["coverage"] = metrics.coverage(fps, ref.fingerprints, n_total=args.n)
    row["symmetry"] = symmetry(valid, ref.statistics)
    unique = metrics.unique_flags(valid)
    row["uniqueness"] = sum(unique) / len(unique) if unique else None
    if args.relax:
        row["stability"] = metastable_rate(valid, args.relax, args.cache, args.data)
    return row


def symmetry(crystals, reference):
    """Share of P1 (symprec 0.1) among ``crystals`` and their space-group JSD to the reference crystals."""
    stats = CrystalStatistics.from_structures(crystals)
    if not len(stats):
        return {"p1_share": None, "spacegroup_jsd": None, "distinct_spacegroups": 0}
    return {"p1_share": float((stats.spacegroups == 1).mean()),
            "spacegroup_jsd": distances(stats, reference)["spacegroup_jsd"],
            "distinct_spacegroups": int(len(set(stats.spacegroups.tolist()) - {0}))}


def conditioned(gen, args, sampling, formulas, extra):
    crystals, stats = sample(gen, len(formulas), seed=args.seed + 1, formula=formulas, **sampling, **extra)
    row, _ = validity(crystals, stats)
    match = (metrics.conditional_accuracy(crystals).get("formula") or {}).get("match")
    row["formula_match_returned"] = match
    row["formula_match_requested"] = None if match is None else match * len(crystals) / len(formulas)
    return row


def score(row):
    """The selection score of the docstring (``None`` when a term is missing)."""
    u = row["unconditional"]
    parts = (u["validity_attempts"]["structure"], u["validity_attempts"]["composition"], u["coverage"]["recall"])
    if any(p is None for p in parts):
        return None
    return (parts[0] + parts[1]) / 2 + parts[2]


def choose(rows):
    """The best row by the selection rule (score to 3 decimals, then precision, then lower temperature)."""
    scored = [r for r in rows if r["score"] is not None]
    if not scored:
        return None
    return max(scored, key=lambda r: (round(r["score"], TIE_DECIMALS), r["unconditional"]["coverage"]["precision"]
                                      or 0.0, -r["temperature"]))


def chosen_settings(best):
    """The chosen row's settings and score, as the results file records them."""
    keys = ("temperature", "top_p", "coordinate_temperature", "score")
    return None if best is None else {k: best[k] for k in keys if k in best}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: the model shipped with the package)")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.5, 0.7, 0.9, 1.0])
    ap.add_argument("--top-p", type=float, nargs="+", default=[0.9, 1.0])
    ap.add_argument("--coordinate-temperatures", type=float, nargs="+", metavar="T",
                    help="also vary the temperature of the fractional coordinates (default: the temperature)")
    ap.add_argument("-n", type=int, default=200, help="unconditional crystals per setting (default 200)")
    ap.add_argument("--n-formulas", type=int, default=50,
                    help="validation formulas, one crystal each per setting (default 50; 0: none)")
    ap.add_argument("--ref-size", type=int, default=500, help="validation crystals for coverage (default 500)")
    ap.add_argument("--relax", type=int, default=0, metavar="K",
                    help="M3GNet metastable rate of the first K valid crystals per setting (default 0: off)")
    ap.add_argument("--guards", action="store_true",
                    help="sample with generate's default decoding (spacing and charge guards, re-sampling of "
                    "too-close crystals) instead of the model alone")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every setting")
    ap.add_argument("--batch-size", type=int, help="generation batch size (default: generate's)")
    ap.add_argument("--device", help="torch device (default: cuda when available)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--data", help="data folder holding mp_20/ and hull/ (default: settings.data_dir())")
    ap.add_argument("--cache", help="cache folder for fingerprints and relaxations")
    ap.add_argument("--output", default=str(RESULTS / "tune_sampling.json"))
    ap.add_argument("--merge", nargs="+", metavar="FILE",
                    help="combine results files of parts of one grid (same model and settings, e.g. run in "
                         "parallel) into --output and choose over all their rows; nothing is sampled")
    args = ap.parse_args(argv)
    if args.n < 1 or args.n_formulas < 0 or args.ref_size < 1 or args.relax < 0:
        ap.error("need -n >= 1, --n-formulas >= 0, --ref-size >= 1 and --relax >= 0")
    if any(t < 0 for t in args.temperatures) or any(not 0 < p <= 1 for p in args.top_p):
        ap.error("need temperatures >= 0 and 0 < top-p <= 1")
    if any(not t > 0 for t in args.coordinate_temperatures or ()):
        ap.error("need coordinate temperatures > 0")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    return args


def run(args, argv=None):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    val_path = settings.mp20_path("val", args.data)
    t0 = time.perf_counter()
    formulas = val_formulas(val_path, args.n_formulas) if args.n_formulas else []
    gen = CrystalGenerator.from_pretrained(args.model, device=args.device)
    extra = generate_kwargs(gen, args.guards)
    if args.batch_size:
        extra["batch_size"] = args.batch_size
    ref = Reference(references.reference_fingerprints(val_path, size=args.ref_size, seed=0, cache=args.cache,
                                                      progress=False),
                    split_statistics(val_path, args.ref_size, seed=0))  # the same rows
    rows = []
    for sampling in grid(args):
        start = time.perf_counter()
        row = {"coordinate_temperature": sampling["temperature"], **sampling,
               "unconditional": unconditional(gen, args, sampling, ref, extra)}
        if formulas:
            row["formula_conditioned"] = conditioned(gen, args, sampling, formulas, extra)
        row["score"] = score(row)
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(summary_line(row), flush=True)
    best = choose(rows)
    return {
        **report_header("tune_sampling", argv),
        "model": str(gen.model_dir),
        "model_weights_sha256": gen.weights_sha256(),
        "model_recommended_sampling": dict(getattr(gen.card, "sampling", None) or {}),
        "split": "val",
        "settings": {"n": args.n, "n_formulas": args.n_formulas, "ref_size": args.ref_size,
                     "ref_seed": 0, "formula_seed": 0, "seed": args.seed, "relax": args.relax,
                     "generate_options": {k: v for k, v in extra.items()}, "device": str(gen.device),
                     "torch_threads": torch.get_num_threads()},
        "selection_rule": "max (structure validity over attempts + composition validity over attempts) / 2 "
                          f"+ coverage recall (unconditional), ties at {TIE_DECIMALS} decimals broken by "
                          "coverage precision, then by the lower temperature",
        "formulas": formulas,
        "rows": rows,
        "chosen": chosen_settings(best),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def merge(paths):
    """One record from results files that each ran part of the grid with the same model and settings."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    first = parts[0]
    for part in parts[1:]:
        for key in ("model_weights_sha256", "settings", "formulas"):
            if part[key] != first[key]:
                raise ValueError(f"cannot merge: {key} differs between {paths[0]} and another file")
    rows = [row for part in parts for row in part["rows"]]
    best = choose(rows)
    return {**first, "command": [part["command"] for part in parts], "rows": rows,
            "chosen": chosen_settings(best),
            "seconds": max(part["seconds"] for part in parts), "merged_from": [str(p) for p in paths]}


def summary_line(row):
    u = row["unconditional"]
    fmt = lambda v: "  n/a" if v is None else f"{v:5.3f}"  # noqa: E731
    line = (f"T={row['temperature']:<4} top_p={row['top_p']:<4} coords T={row['coordinate_temperature']:<4} "
            f"struct/att {fmt(u['validity_attempts']['structure'])} "
            f"comp/att {fmt(u['validity_attempts']['composition'])} recall {fmt(u['coverage']['recall'])} "
            f"precision {fmt(u['coverage']['precision'])} unique {fmt(u['uniqueness'])} "
            f"P1 {fmt(u['symmetry']['p1_share'])} SG JSD {fmt(u['symmetry']['spacegroup_jsd'])}")
    if "formula_conditioned" in row:
        line += f" formula {fmt(row['formula_conditioned']['formula_match_requested'])}"
    return line + f" score {fmt(row['score'])} ({row['seconds']} s)"


def main(argv=None):
    args = parse_args(argv)
    try:
        record = merge(args.merge) if args.merge else run(args, argv)
    except (FileNotFoundError, ValueError, KeyError) as err:
        sys.exit(f"tune_sampling: error: {err}")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(record, indent=2) + "\n")
    chosen = record["chosen"]
    print("chosen: " + ("none (no setting produced a valid crystal)" if chosen is None else
                        f"temperature {chosen['temperature']}, top_p {chosen['top_p']}, coordinates "
                        f"{chosen.get('coordinate_temperature', chosen['temperature'])} (score {chosen['score']:.3f})"))
    print(f"results: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
