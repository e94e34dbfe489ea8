#!/usr/bin/env bash
# The recorded evaluation of a shipped model (docs/model_card.md; the smollm2 adapter's card).
# Usage: bash benchmarks/evaluate_default_model.sh OUT_DIR [MODEL [N [N_COND]]]
#   MODEL: a shipped model's name or a model directory (default: default); N unconditional crystals
#   (default 1000; 3/10 of them again without the guards); N_COND val rows for the conditions (default 100).
#   bash benchmarks/evaluate_default_model.sh runs/eval_smollm2 smollm2 300 50
# PHASE=conditions writes the val conditions only, PHASE=generate the crystals only (e.g. on a GPU
# machine without pymatgen: benchmarks/gpu_run.sh), PHASE=evaluate evaluates those already in OUT_DIR;
# default all.  formulas.txt and spacegroups.txt already in OUT_DIR are kept.
# IPT_SIZE: test crystals for the IPT symmetry score (default N/2; 0 skips it, as the smollm2 card's runs do).
# GEN_ARGS adds options to every `crystal-llm generate`: GEN_ARGS="--covalent-ratio 0" draws as the
# recorded runs did, before generate's element-aware distance floor (2026-12-04).
# Needs ../shared (or $CRYSTAL_LLM_DATA and $CRYSTAL_LLM_M3GNET); about 40 minutes on 2 CPU cores for the
# default model.  The calibration rows (model-independent) are recorded with the default model only.
set -euo pipefail
out=${1:?usage: evaluate_default_model.sh OUT_DIR [MODEL [N [N_COND]]]}
name=${2:-default}
n=${3:-1000}
n_cond=${4:-100}
here=$(cd "$(dirname "$0")" && pwd)
model=$(python -c "import sys; from ase_crystal_llm import settings; print(settings.model_folder(sys.argv[1]).resolve())" "$name")
phase=${PHASE:-all}
mkdir -p "$out" && cd "$out"
export OMP_NUM_THREADS=1

# Conditions come from the validation split (N_COND random rows, seed 0), never from test.
[ -s formulas.txt ] && [ -s spacegroups.txt ] || python - "$n_cond" <<'EOF'
import sys
import pandas as pd
from ase_crystal_llm import settings
rows = pd.read_csv(settings.mp20_path("val")).sample(int(sys.argv[1]), random_state=0)
open("formulas.txt", "w").write(",".join(rows["pretty_formula"]))
open("spacegroups.txt", "w").write(",".join(str(int(g)) for g in rows["spacegroup.number"]))
EOF
[ "$phase" = conditions ] && exit 0

if [ "$phase" != evaluate ]; then
# shellcheck disable=SC2086  # GEN_ARGS is a list of options
gen() { crystal-llm generate --model "$model" ${GEN_ARGS:-} "$@"; }
# Default sampling settings (the model card's), N unconditional crystals.
gen -n "$n" -o samples.extxyz --seed 0
# Formula-conditioned: with the composition constraint (the default) and with the model alone.
gen -n "$n_cond" -o formula.extxyz --seed 1 --formula "$(cat formulas.txt)"
gen -n "$n_cond" -o formula_free.extxyz --seed 1 --formula "$(cat formulas.txt)" --free-formula
# The model alone, without the spacing and charge guards: its own validity over its draws.
gen -n $((n * 3 / 10)) -o samples_unguarded.extxyz --seed 0 --no-spacing-guard --no-charge-guard
# Space group: training always puts the formula first, so ask for each val row's formula and space group,
# with the formula constraint and with the model alone.
gen -n "$n_cond" -o spacegroup.extxyz --seed 2 --formula "$(cat formulas.txt)" --spacegroup "$(cat spacegroups.txt)"
gen -n "$n_cond" -o spacegroup_free.extxyz --seed 2 --formula "$(cat formulas.txt)" \
    --spacegroup "$(cat spacegroups.txt)" --free-formula
fi
[ "$phase" = generate ] && exit 0

# IPT scores translated test crystals with the model (slow for a 135M adapter on CPU): IPT_SIZE=0 skips it.
ipt_size=${IPT_SIZE:-$((n / 2))}
ipt=()
[ "$ipt_size" -gt 0 ] && ipt=(--model "$model" --ipt-size "$ipt_size")
crystal-llm evaluate samples.extxyz -o report --coverage-size 1000 "${ipt[@]}" --workers 2 --no-progress
for f in formula formula_free spacegroup spacegroup_free samples_unguarded; do
    crystal-llm evaluate $f.extxyz -o report_$f --coverage-size 1000 --workers 2 --no-progress
done
if [ "$name" = default ]; then
    python "$here/calibration.py" --n-test 1000 --n-paper 250 --n-swap 1000 --out calibration.json
fi
