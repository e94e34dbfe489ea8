#!/usr/bin/env bash
# The recorded evaluation of the shipped default model (docs/model_card.md).
# Usage: bash benchmarks/evaluate_default_model.sh OUT_DIR
set -euo pipefail
out=${1:?usage: evaluate_default_model.sh OUT_DIR}
model=$(python -c "from ase_crystal_llm import settings; print(settings.DEFAULT_MODEL_DIR)")
mkdir -p "$out" && cd "$out"
export OMP_NUM_THREADS=1
# 30 formulas drawn from the MP-20 val split (random.seed(0), 40 rows, sorted, first 30).
formulas="AcAg3,AlHO2,Ba2DyWO6,Bi2WO6,Ca4CrN4,Ca5Au3,Co4TeO8,Dy(Fe5Mo)2,ErSnPd,Fe6Ge2N,Gd2ReC2,GdCu5,Hf6CoBi2,Ho2NiIr,Ho4Cu5P7,K2PtF6,La(AlSi)2,LaAsIr,Li4Cr(WO4)3,Li6Mn3CoO10,LiCuS,LiNiP,LiVF5,LuUB8,MgPb2,Mn(VSi3)2,Nb5Ga4,Nd(ZnAs)3,Pr3(AgGe)4,ScMn2"
crystal-llm generate -n 300 -o samples.extxyz --seed 0
crystal-llm generate -n 60 -o conditioned.extxyz --seed 1 --formula "$formulas"
crystal-llm evaluate samples.extxyz -o report --coverage-size 500 --model "$model" --ipt-size 100 --no-progress
crystal-llm evaluate conditioned.extxyz -o report_conditioned --coverage-size 500 --no-progress
