#!/usr/bin/env bash
# The recorded evaluation of the shipped default model (docs/model_card.md).
# Usage: bash benchmarks/evaluate_default_model.sh OUT_DIR
# Needs ../shared (or $CRYSTAL_LLM_DATA and $CRYSTAL_LLM_M3GNET); about 40 minutes on 2 CPU cores.
set -euo pipefail
out=${1:?usage: evaluate_default_model.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
model=$(python -c "from ase_crystal_llm import settings; print(settings.DEFAULT_MODEL_DIR)")
data=$(python -c "from ase_crystal_llm import settings; print(settings.data_dir())")
mkdir -p "$out" && cd "$out"
export OMP_NUM_THREADS=1

# Conditions come from the validation split (100 random rows, seed 0), never from test.
python - "$data/mp_20/val.csv.gz" <<'EOF'
import sys
import pandas as pd
rows = pd.read_csv(sys.argv[1]).sample(100, random_state=0)
open("formulas.txt", "w").write(",".join(rows["pretty_formula"]))
open("spacegroups.txt", "w").write(",".join(str(int(g)) for g in rows["spacegroup.number"]))
EOF

# Default sampling settings (the model card's), 1,000 unconditional crystals.
crystal-llm generate -n 1000 -o samples.extxyz --seed 0
# Formula-conditioned: with the composition constraint (the default) and with the model alone.
crystal-llm generate -n 100 -o formula.extxyz --seed 1 --formula "$(cat formulas.txt)"
crystal-llm generate -n 100 -o formula_free.extxyz --seed 1 --formula "$(cat formulas.txt)" --free-formula
# The model alone, without the spacing and charge guards: its own validity over its draws.
crystal-llm generate -n 300 -o samples_unguarded.extxyz --seed 0 --no-spacing-guard --no-charge-guard
# Space group: training always puts the formula first, so ask for each val row's formula and space group.
crystal-llm generate -n 100 -o spacegroup.extxyz --seed 2 --formula "$(cat formulas.txt)" --spacegroup "$(cat spacegroups.txt)"

crystal-llm evaluate samples.extxyz -o report --coverage-size 1000 --model "$model" --ipt-size 500 --workers 2 --no-progress
for f in formula formula_free spacegroup samples_unguarded; do
    crystal-llm evaluate $f.extxyz -o report_$f --coverage-size 1000 --workers 2 --no-progress
done
python "$here/calibration.py" --n-test 1000 --n-paper 250 --n-swap 1000 --out calibration.json
