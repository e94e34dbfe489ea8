"""Training: LoRA / QLoRA fine-tuning of any causal LM, or small LLaMA models from scratch.

:func:`train` is the Python side of ``crystal-llm train``.  It reads crystals
with :func:`ase_crystal_llm.datasets.read_structures`, turns each into a
training example of the multitask curriculum (:func:`prompts.make_example`),
and optimises the answer tokens only.

Design points
-------------
* **Labels**: prompt and answer are tokenised separately and the ids
  concatenated, so the prompt/answer boundary is exact for any tokenizer; the
  labels are ``-100`` on the prompt and on padding (found from the attention
  mask, not the token id), so an end-of-sequence token that doubles as padding
  still teaches the model to stop.
* **Loss averaging**: ``per_token`` (default: every answer token of a global
  batch weighs the same, as in Hugging Face's causal-LM loss) or
  ``per_example`` (every example weighs the same, so a 2-token infill answer
  counts as much as a 170-token crystal).  The card records the choice.
* **Batches** are bucketed by length (sorted inside shuffled chunks), so a
  batch pads to similar lengths.
* **Exact resume**: each example's task, translation, conditions and mask come
  from ``(seed, epoch, index)``, the batch order from ``(seed, epoch)``, and a
  checkpoint stores weights (safetensors), optimiser, scheduler and RNG
  states (plain tensors: ``torch.load(weights_only=True)``), so a killed run
  resumes onto the same loss curve.
* **Data parallel** through Hugging Face Accelerate: ``accelerate launch -m
  ase_crystal_llm.cli train ...`` splits every optimiser step's micro-batches
  over the processes with no code change.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import settings
from .modelcard import CARD_NAME, ModelCard, hash_weights, verify_hashes
from .prompts import PromptTemplate, make_example

IGNORE_INDEX = -100
LOG_NAME = "training_log.json"
CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
LOSS_AVERAGING = ("per_token", "per_example")

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


# --------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Everything that determines a training run (recorded in the card and checkpoints)."""

    base: str | None = None
    from_scratch: str | None = None
    quantize: str | None = None
    full: bool = False
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int | None = None
    grad_accum: int = 1
    lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_rank: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list | str | None = None
    loss_averaging: str = "per_token"
    infill_fraction: float = 1 / 3
    max_length: int | None = None
    eval_every: int | None = None
    save_every: int | None = None
    val_limit: int | None = 512
    seed: int = 0
    canonical: bool = True
    limit: int | None = None
    extra: dict = field(default_factory=dict)

    def resolve(self):
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
        if self.quantize not in (None, "4bit", "8bit"):
            raise ValueError(f"quantize must be '4bit' or '8bit', got {self.quantize!r}")
        if self.loss_averaging not in LOSS_AVERAGING:
            raise ValueError(f"loss_averaging must be one of {LOSS_AVERAGING}, got {self.loss_averaging!r}")
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


# --------------------------------------------------------------------------- data




def _source_files(source):
    """Local files behind a source (glob expanded), or None for URLs and lists."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    name = os.path.expanduser(str(source))
    if "://" in name:
        return None
    files = sorted(glob.glob(name)) if any(c in name for c in "*?[") else [name]
    return [Path(f) for f in files if Path(f).is_file()] or None


def _sha256_files(files):
    from .modelcard import sha256_file

    digest = hashlib.sha256()
    for path in files:
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def _structures_hash(structures):
    from .text import atoms_to_text

    digest = hashlib.sha256()
    for atoms in structures:
        digest.update(atoms_to_text(atoms).encode())
        digest.update(json.dumps(_json_info(atoms.info), sort_keys=True).encode())
    return digest.hexdigest()


def _json_info(info):
    out = {}
    for key, value in info.items():
        if isinstance(value, (np.integer, np.floating)):
            value = value.item()
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = value
    return out


def _save_structure_cache(path, structures):
    counts = np.array([len(a) for a in structures], dtype=np.int64)
    arrays = dict(
        counts=counts,
        numbers=np.concatenate([a.numbers for a in structures]).astype(np.int16),
        frac=np.concatenate([a.get_scaled_positions(wrap=False) for a in structures]),
        cells=np.array([np.array(a.cell) for a in structures]),
        info=np.array(json.dumps([_json_info(a.info) for a in structures])),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load_structure_cache(path):
    from ase import Atoms

    with np.load(path, allow_pickle=False) as data:
        infos = json.loads(str(data["info"]))
        bounds = np.concatenate([[0], np.cumsum(data["counts"])])
        numbers, frac, cells = data["numbers"], data["frac"], data["cells"]
        structures = []
        for i, info in enumerate(infos):
            s = slice(bounds[i], bounds[i + 1])
            atoms = Atoms(numbers=numbers[s], scaled_positions=frac[s], cell=cells[i], pbc=True)
            atoms.info = info
            structures.append(atoms)
    return structures


def load_training_structures(source, *, canonical=True, limit=None, skip_bad=False, cache=True, cache_dir=None):
    """Read (and cache) the structures of a training or validation split.

    Canonicalising 27k MP-20 cells takes minutes, so file sources are cached
    under ``$CRYSTAL_LLM_CACHE`` (default ``~/.cache/ase-crystal-llm``), keyed
    by the files' sha256 and the reading options.

    Returns
    -------
    structures : list of ase.Atoms
    record : dict
        ``source``, ``sha256`` (of the files, or of the structures for a
        list), ``hash_of`` and ``n_structures``, for the model card.
    """
    from ase import Atoms

    if isinstance(source, Atoms):
        source = [source]
    if isinstance(source, (list, tuple)):
        structures = list(source)[:limit] if limit else list(source)
        record = {"source": "<structures>", "sha256": _structures_hash(structures), "hash_of": "structures"}
    else:
        structures, record = _read_source(source, canonical, limit, skip_bad, cache, cache_dir)
    if not structures:
        raise ValueError(f"no structures in {record['source']}: the dataset is empty")
    record["n_structures"] = len(structures)
    return structures, record


def _read_source(source, canonical, limit, skip_bad, cache, cache_dir):
    from . import datasets

    files = _source_files(source)
    if files is None and "://" not in str(source):
        raise FileNotFoundError(f"structure source not found: {source}")
    record = {"source": str(source), "hash_of": "files" if files else "structures"}
    cache_path = None
    if files:
        record["sha256"] = _sha256_files(files)
        if cache:
            options = json.dumps(
                [record["sha256"], canonical, limit, skip_bad, _module_hash(datasets)], sort_keys=True
            )
            key = hashlib.sha256(options.encode()).hexdigest()[:32]
            cache_path = settings.cache_dir(cache_dir) / "structures" / f"{key}.npz"
            if cache_path.is_file():
                try:
                    return _load_structure_cache(cache_path), record
                except Exception:  # a damaged cache is rebuilt, never fatal
                    pass
    structures = datasets.read_structures(source, canonical=canonical, limit=limit, skip_bad=skip_bad)
    if files is None:
        record["sha256"] = _structures_hash(structures)
    if cache_path is not None and structures:
        with contextlib.suppress(OSError):
            _save_structure_cache(cache_path, structures)
    return structures, record


def _module_hash(module):
    return hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()[:16]


# --------------------------------------------------------------------------- encoding


def encode_example(tokenizer, prompt, answer):
    """Token ids of prompt + answer + EOS and the number of prompt tokens.

    Prompt and answer are tokenised separately (the prompt with the
    tokenizer's special tokens, e.g. BOS; the answer without), so the
    boundary is exact even for tokenizers that add a prefix space.
    """
    ids, n_prompt = encode_examples(tokenizer, [prompt], [answer])
    return ids[0], int(n_prompt[0])


def encode_examples(tokenizer, prompts, answers):
    """Batched :func:`encode_example`: a list of id arrays and the prompt lengths."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-sequence token")
    p_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    a_ids = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    ids = [np.asarray(p + a + [eos], dtype=np.int64) for p, a in zip(p_ids, a_ids)]
    n_prompt = np.array([len(p) for p in p_ids], dtype=np.int64)
    return ids, n_prompt


def collate(examples, pad_id):
    """Pad encoded examples into a batch.

    Parameters
    ----------
    examples : list of (ids, n_prompt)
    pad_id : int
        Filler token id; padding is excluded through the attention mask, so it
        may equal the EOS id.

    Returns
    -------
    dict of torch.LongTensor
        ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on prompt
        tokens and padding).
    """
    import torch

    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), int(pad_id), dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, _) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.as_tensor(ids)
        attention[row, : len(ids)] = 1
    labels = input_ids.clone()
    labels[attention == 0] = IGNORE_INDEX
    for row, (_, n_prompt) in enumerate(examples):
        labels[row, :n_prompt] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class EpochData:
    """The encoded examples and length-bucketed batches of one epoch.

    Everything is a pure function of ``(seed, epoch)``, so a resumed run
    rebuilds exactly the batches it would have seen.
    """

    CHUNK = 64  # batches per length-sorting chunk

    def __init__(self, structures, tokenizer, template, *, seed, epoch, batch_size, infill_fraction, max_length):
        examples = [
            make_example(a, template, seed=seed, epoch=epoch, index=i, infill_fraction=infill_fraction)
            for i, a in enumerate(structures)
        ]
        self.tasks = [e.task for e in examples]
        self.ids, self.n_prompt = encode_examples(tokenizer, [e.prompt for e in examples], [e.answer for e in examples])
        self.lengths = np.array([len(x) for x in self.ids])
        self.too_long = int(np.sum(self.lengths > max_length)) if max_length else 0
        self.batches = self._batches(seed, epoch, batch_size, max_length)

    def _batches(self, seed, epoch, batch_size, max_length):
        rng = np.random.default_rng([int(seed), int(epoch), 0xBA7C])
        order = rng.permutation(len(self.ids))
        chunk = batch_size * self.CHUNK
        batches = []
        for start in range(0, len(order), chunk):
            part = order[start : start + chunk]
            part = part[np.argsort(-self.lengths[part], kind="stable")]
            batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        if max_length:  # overlong examples are dropped; the batch count stays fixed
            batches = [b[self.lengths[b] <= max_length] for b in batches]
        return batches

    def batch(self, j):
        return [(self.ids[i], int(self.n_prompt[i])) for i in self.batches[j]]


# --------------------------------------------------------------------------- models


def scratch_config(size, tokenizer, max_positions=MAX_POSITIONS):
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


def count_parameters(size):
    """Parameter count of a from-scratch size with the default tokenizer."""
    from transformers import LlamaForCausalLM

    from .tokenizer import tokenizer_for_template

    model = LlamaForCausalLM(scratch_config(size, tokenizer_for_template(PromptTemplate())))
    return sum(p.numel() for p in model.parameters())


def _missing_base_message(base):
    return (
        f"base model {base!r} is neither a local directory nor in the local Hugging Face cache, "
        "and the hub cannot be reached (offline): download it elsewhere and pass its local "
        "directory, e.g. --base /path/to/Llama-2-7b-hf"
    )


@contextlib.contextmanager
def _base_errors(base):
    """Turn transformers' download failures for a hub id into one clear error."""
    try:
        yield
    except OSError as err:
        if Path(os.path.expanduser(str(base))).exists():
            raise
        raise FileNotFoundError(_missing_base_message(base)) from err


def resolve_base(base: str) -> str:
    """Where a base model is: a model directory, a ``.gguf`` file, or a hub id in the local cache.

    ``base`` may be a named base (:data:`settings.NAMED_BASES`, e.g. ``smollm2-135m``),
    a ``.gguf`` file, a folder holding one ``.gguf`` file, a Hugging Face model
    directory, or a hub id.

    Raises
    ------
    FileNotFoundError
        When the base is none of these (offline), or a named base is not installed.
    """
    named = settings.named_base_file(base)
    if named is not None:
        return str(named)
    path = Path(os.path.expanduser(str(base)))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise FileNotFoundError(f"base model file {path} is not a .gguf file: pass a .gguf file or a model directory")
        return str(path.resolve())
    if path.is_dir():
        return _resolve_base_dir(path)
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(str(base), "config.json")
    except Exception:  # not a valid repo id
        cached = None
    if isinstance(cached, str):
        return str(base)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise FileNotFoundError(_missing_base_message(base))
    return str(base)  # online: let transformers download it


def _resolve_base_dir(path):
    if (path / "config.json").is_file():
        return str(path.resolve())
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise FileNotFoundError(
            f"base model directory {path} holds {len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs)}): pass one"
        )
    if not ggufs:
        raise FileNotFoundError(f"base model directory {path} has neither config.json nor a .gguf file")
    return str(ggufs[0].resolve())


def pretrained_args(resolved: str) -> tuple[str, dict]:
    """``from_pretrained`` arguments for a resolved base: a GGUF file loads from its
    folder with ``gguf_file=`` (transformers dequantises it with the ``gguf`` package)."""
    if resolved.lower().endswith(".gguf"):
        settings.require("gguf")
        path = Path(resolved)
        return str(path.parent), {"gguf_file": path.name}
    return resolved, {}


def base_record(base: str) -> dict:
    """What the model card records of a base: its name as given and, for a file, its sha256."""
    from .modelcard import sha256_file

    resolved = resolve_base(base)
    record = {"name": str(base)}
    if resolved.lower().endswith(".gguf"):
        record.update(file=Path(resolved).name, sha256=sha256_file(resolved))
    return record


def check_base(card: ModelCard, base: str) -> None:
    """Refuse an adapter's base file that is not the one it was trained on."""
    from .modelcard import ModelCardError, sha256_file

    expected = (card.extra.get("base") or {}).get("sha256")
    resolved = resolve_base(base)
    if expected and resolved.lower().endswith(".gguf") and sha256_file(resolved) != expected:
        raise ModelCardError(
            f"base model file {resolved} is not the one this adapter was trained on (sha256 differs): "
            f"pass the original with --base"
        )


def _compute_dtype(device):
    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@contextlib.contextmanager
def quiet_loading():
    """No weight-loading progress bars: transformers' own (its switch) and its GGUF reader's (plain tqdm)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_loading
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    bar = gguf_loading.tqdm
    gguf_loading.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_loading.tqdm = bar
        if enabled:
            hf_logging.enable_progress_bar()


def load_base_model(base, *, quantize=None, device=None, dtype=None):
    """Load a causal LM (optionally 4-bit NF4 / 8-bit) from a hub id or directory."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = torch.device(device or "cpu")
    dtype = dtype or _compute_dtype(device)
    kwargs = {"dtype": dtype}
    if quantize:
        settings.require("bitsandbytes")
        if device.type == "cpu":
            warnings.warn(f"{quantize} quantisation on CPU runs through bitsandbytes' CPU backend: slow", stacklevel=2)
        if quantize == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        index = device.index if device.index is not None else 0
        kwargs["device_map"] = {"": index if device.type == "cuda" else "cpu"}
    source, extra = pretrained_args(resolve_base(base))
    if quantize and "gguf_file" in extra:
        source, extra = _gguf_as_directory(Path(source) / extra["gguf_file"]), {}
    with _base_errors(base), quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs, **extra)
    if "gguf_file" in extra:
        _forget_gguf_quantizer(model)
    if not quantize:
        model.to(device)
    return model


def _gguf_as_directory(gguf_path):
    """A GGUF base as a Hugging Face model directory, dequantised once and cached by the
    file's sha256: transformers cannot apply a bitsandbytes config while it reads GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .modelcard import sha256_file

    gguf_path = Path(gguf_path)
    target = settings.cache_dir() / "gguf" / f"{gguf_path.stem}-{sha256_file(gguf_path)[:16]}"
    if (target / "config.json").is_file():
        return str(target)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        _forget_gguf_quantizer(model)
        model.save_pretrained(staging, safe_serialization=True)
        AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(staging)
    os.replace(staging, target)  # atomic: a second process finds a whole directory or none
    return str(target)


def _forget_gguf_quantizer(model):
    """transformers dequantises a GGUF into ordinary float weights but keeps a "gguf"
    quantizer marker, which refuses save_pretrained (merge, --full): drop the marker."""
    model.hf_quantizer = None
    model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def load_base_tokenizer(base):
    """The base model's tokenizer, with a pad token (EOS if it has none)."""
    from transformers import AutoTokenizer

    source, extra = pretrained_args(resolve_base(base))
    with _base_errors(base), quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {base} has no end-of-sequence token")
    for key in ("local_files_only", "is_local"):  # how it was loaded here, not what the saved model is
        tokenizer.init_kwargs.pop(key, None)
    if tokenizer.pad_token_id is None:
        # Padding is masked by the attention mask, so EOS can double as pad.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _lora_config(cfg):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules or "all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_trained(model_dir, *, base=None, device=None, quantize=None, verify=True):
    """Load a model directory written by :func:`train` (full weights or adapter).

    Parameters
    ----------
    model_dir : str or Path
    base : str, optional
        Where the base model of an adapter lives now (overrides the card).
    device : str, optional
    quantize : {"4bit", "8bit"}, optional
        Load an adapter's base quantised.

    Returns
    -------
    model, tokenizer, card
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    card = ModelCard.from_pretrained(model_dir)
    if verify:
        card.verify_weights(model_dir)
    device = torch.device(device or "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if card.kind == "lora":
        from peft import PeftModel

        base = base or card.base_model
        check_base(card, base)
        model = load_base_model(base, quantize=quantize, device=device)
        model = PeftModel.from_pretrained(model, model_dir)
    else:
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_compute_dtype(device)).to(device)
    model.eval()
    return model, tokenizer, card


def checkpoints(run_dir) -> list[Path]:
    """The finished checkpoints of a training run, oldest first (``<run>/checkpoints/step-*``)."""
    root = Path(run_dir) / CHECKPOINTS
    found = sorted(root.glob("step-*")) if root.is_dir() else []
    return [p for p in found if (p / STATE_NAME).is_file()]


def load_checkpoint(checkpoint_dir, *, base=None, device=None):
    """Load the model of one training checkpoint (to evaluate a learning curve).

    A checkpoint has no model card: its ``trainer_state.json`` says how the run
    was set up (from scratch, full weights over a base, or a LoRA adapter over
    ``base``, which overrides where the base lives now).

    Returns
    -------
    model, tokenizer, state : the model in eval mode, its tokenizer, the trainer state (dict)
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint_dir = Path(checkpoint_dir)
    state = json.loads((checkpoint_dir / STATE_NAME).read_text())
    verify_hashes(checkpoint_dir, state.get("weights", {}))
    device = torch.device(device or "cpu")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    fingerprint = state["fingerprint"]
    if fingerprint.get("from_scratch") or fingerprint.get("full"):
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32).to(device)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_base_model(base or fingerprint["base"], device=device), checkpoint_dir)
        model = model.merge_and_unload()
    return model.eval(), tokenizer, state


# --------------------------------------------------------------------------- training loop


class _Checkpoints:
    """``<out>/checkpoints/step-NNNNNNN``: written to a temporary folder, then renamed."""

    def __init__(self, out, keep=2):
        self.root = Path(out) / CHECKPOINTS
        self.keep = keep

    def latest(self):
        found = checkpoints(self.root.parent)
        return found[-1] if found else None

    def staging(self, step):
        return self.root / f".tmp-step-{step:07d}"

    def commit(self, step):
        final = self.root / f"step-{step:07d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(self.staging(step), final)
        for old in sorted(self.root.glob("step-*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def _fingerprint(cfg, data_record, val_record, world_size, template):
    keys = (
        "base", "from_scratch", "quantize", "full", "batch_size", "grad_accum", "lr", "warmup_steps",
        "weight_decay", "max_grad_norm", "lora_rank", "lora_alpha", "lora_dropout",
        "target_modules", "loss_averaging", "infill_fraction", "max_length", "seed", "canonical",
    )  # fmt: skip
    fp = {k: getattr(cfg, k) for k in keys}
    fp.update(
        total_steps=cfg.extra.get("total_steps"),
        data_sha256=data_record.get("sha256"),
        val_sha256=(val_record or {}).get("sha256"),
        world_size=world_size,
        prompts=template.to_dict(),
    )
    return json.loads(json.dumps(fp))


class _Trainer:
    """One training run; :func:`train` is the public entry point."""

    def __init__(self, cfg, out, structures, data_record, val_structures, val_record, template, *,
                 resume, progress, callbacks, keep_checkpoints, precision):  # fmt: skip
        import torch
        from accelerate import Accelerator

        self.cfg, self.out, self.template = cfg, Path(out), template
        self.structures, self.data_record = structures, data_record
        self.val_structures, self.val_record = val_structures, val_record
        self.callbacks = list(callbacks or ())
        self.progress = progress
        # cpu=True on a CPU-only host makes torchrun / ``accelerate launch --multi_gpu``
        # start gloo data parallelism (accelerate picks MULTI_CPU only when asked).
        self.acc = Accelerator(mixed_precision=precision or "no", cpu=not torch.cuda.is_available())
        self.checkpoints = _Checkpoints(self.out, keep_checkpoints)
        self.resume_dir = self._find_resume() if resume else None
        self._epoch_cache = {}
        self.log = {"steps": [], "eval": []}

    # -- setup ----------------------------------------------------------------
    def _find_resume(self):
        latest = self.checkpoints.latest()
        if latest is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.checkpoints.root}")
        return latest

    def setup(self):
        import torch
        from transformers import get_cosine_schedule_with_warmup

        cfg, acc = self.cfg, self.acc
        torch.manual_seed(cfg.seed)
        self.tokenizer = self._tokenizer()
        self.pad_id = self.tokenizer.pad_token_id
        if cfg.max_length is None:
            limit = getattr(self.tokenizer, "model_max_length", MAX_POSITIONS)
            cfg.max_length = int(limit) if limit and limit < 1_000_000 else MAX_POSITIONS
        self.world = acc.num_processes
        self.micro_per_step = self.world * cfg.grad_accum
        self.n_batches = math.ceil(len(self.structures) / cfg.batch_size)
        if cfg.max_steps is None:
            epochs = cfg.epochs if cfg.epochs is not None else 1.0
            cfg.max_steps = max(1, math.ceil(epochs * self.n_batches / self.micro_per_step))
        total = cfg.max_steps
        resumed = self._resume_state()
        if cfg.warmup_steps is None:
            # An extended run keeps the warmup it started with (it was derived from the old total).
            cfg.warmup_steps = resumed.get("fingerprint", {}).get("warmup_steps") or min(100, max(1, total // 10))
        cfg.eval_every = cfg.eval_every or min(500, max(1, total // 10))
        cfg.save_every = cfg.save_every or min(500, total)
        cfg.extra["total_steps"] = total
        self.fingerprint = _fingerprint(cfg, self.data_record, self.val_record, self.world, self.template)
        self.start_step = 0
        if self.resume_dir is not None:
            self._check_resume(resumed)
        self.model = self._model()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, cfg.warmup_steps, total)
        if self.resume_dir is not None:
            self._load_states()
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        self.val_batches = self._val_batches()

    def _tokenizer(self):
        if self.resume_dir is not None and (self.resume_dir / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.resume_dir)
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            return tok
        if self.cfg.from_scratch:
            from .tokenizer import tokenizer_for_template

            sample = [self.template.generation_prompt(_conditions(a)) for a in self.structures[:2000]]
            return tokenizer_for_template(self.template, sample)
        return load_base_tokenizer(self.cfg.base)

    def _model(self):
        import torch

        cfg, device = self.cfg, self.acc.device
        if cfg.from_scratch:
            from transformers import LlamaForCausalLM

            if self.resume_dir is not None:
                return LlamaForCausalLM.from_pretrained(self.resume_dir, dtype=torch.float32)
            return LlamaForCausalLM(scratch_config(cfg.from_scratch, self.tokenizer))
        if cfg.full:
            # fp32 master weights; accelerate's mixed precision casts for compute.
            return load_base_model(self.resume_dir or cfg.base, device=device, dtype=torch.float32)
        from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

        model = load_base_model(cfg.base, quantize=cfg.quantize, device=device)
        if cfg.quantize:
            # Non-reentrant checkpointing: the reentrant kind breaks under DDP.
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=device.type == "cuda",
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        if self.resume_dir is not None:
            return PeftModel.from_pretrained(model, self.resume_dir, is_trainable=True)
        return get_peft_model(model, _lora_config(cfg))

    def _resume_state(self):
        if self.resume_dir is None:
            return {}
        return json.loads((self.resume_dir / STATE_NAME).read_text())

    def _check_resume(self, state):
        """Same configuration as the checkpoint's; only the total length may grow.

        A larger ``max_steps`` extends the run as Hugging Face's Trainer does: the
        cosine schedule is rebuilt for the new total and continues from the
        checkpoint's step (the warmup stays as it was).
        """
        old = state.get("fingerprint", {})
        differ = sorted(
            k for k in set(old) | set(self.fingerprint) if k != "total_steps" and old.get(k) != self.fingerprint.get(k)
        )
        if differ:
            raise ValueError(
                f"checkpoint {self.resume_dir} comes from another configuration (differs in: "
                f"{', '.join(differ)}): resume with the same settings or choose a new --out"
            )
        step, total = int(state["step"]), self.fingerprint["total_steps"]
        if total < step:
            raise ValueError(
                f"--max-steps {total} is below the checkpoint's step {step}: pass at least {step} to resume"
            )
        # A torn or corrupted checkpoint must say so, not fail deep inside safetensors.
        verify_hashes(self.resume_dir, state.get("weights", {}))
        self.start_step = step
        self.log = state.get("log", self.log)
        if old.get("total_steps") not in (None, total):
            self.log.setdefault("extensions", []).append(
                {"at_step": step, "from_total_steps": old["total_steps"], "to_total_steps": total}
            )

    def _load_states(self):
        import torch

        d = self.resume_dir
        self.optimizer.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(d / "scheduler.pt", weights_only=True))
        # The saved rates belong to the old total; an extended run takes them from the new schedule.
        sched = self.scheduler
        lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs
        rng_file = d / f"rng-{self.acc.process_index}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if torch.cuda.is_available() and "cuda" in rng:
                torch.cuda.set_rng_state_all(list(rng["cuda"]))

    # -- data -----------------------------------------------------------------
    def _epoch(self, epoch):
        if epoch not in self._epoch_cache:
            self._epoch_cache.clear()  # one epoch in memory at a time
            data = EpochData(
                self.structures, self.tokenizer, self.template, seed=self.cfg.seed, epoch=epoch,
                batch_size=self.cfg.batch_size, infill_fraction=self.cfg.infill_fraction,
                max_length=self.cfg.max_length,
            )  # fmt: skip
            if data.too_long and self.acc.is_main_process:
                warnings.warn(
                    f"epoch {epoch}: {data.too_long} example(s) longer than {self.cfg.max_length} tokens skipped",
                    stacklevel=2,
                )
            self._epoch_cache[epoch] = data
        return self._epoch_cache[epoch]

    def _micro_batches(self, step):
        """This process's micro-batches of one optimiser step."""
        first = step * self.micro_per_step + self.acc.process_index * self.cfg.grad_accum
        batches = []
        for p in range(first, first + self.cfg.grad_accum):
            epoch, j = divmod(p, self.n_batches)
            batch = self._epoch(epoch).batch(j)
            if batch:
                batches.append(collate(batch, self.pad_id))
        return batches

    def _val_batches(self):
        if not self.val_structures:
            return []
        structures = self.val_structures[: self.cfg.val_limit] if self.cfg.val_limit else self.val_structures
        data = EpochData(
            structures, self.tokenizer, self.template, seed=self.cfg.seed, epoch=0,
            batch_size=self.cfg.batch_size, infill_fraction=self.cfg.infill_fraction,
            max_length=self.cfg.max_length,
        )  # fmt: skip
        order = np.argsort(data.lengths, kind="stable")
        order = order[data.lengths[order] <= self.cfg.max_length]
        size = self.cfg.batch_size
        mine = range(self.acc.process_index * size, len(order), self.world * size)
        return [collate([(data.ids[i], int(data.n_prompt[i])) for i in order[s : s + size]], self.pad_id) for s in mine]

    # -- loss -----------------------------------------------------------------
    def _token_weights(self, labels):
        """Weight of each label token: 1 (per token) or 1/answer length (per example)."""
        mask = (labels[:, 1:] != IGNORE_INDEX).float()
        if self.cfg.loss_averaging == "per_token":
            return mask
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1)

    def _normaliser(self, labels):
        mask = labels[:, 1:] != IGNORE_INDEX
        if self.cfg.loss_averaging == "per_token":
            return float(mask.sum())
        return float(mask.any(dim=1).sum())

    def _loss_sum(self, batch):
        import torch.nn.functional as F

        batch = {k: v.to(self.acc.device) for k, v in batch.items()}
        # Right padding under causal attention: no real token attends to padding,
        # so the attention mask is left out (with it, CPU attention is ~10x slower).
        logits = self.model(input_ids=batch["input_ids"]).logits
        labels = batch["labels"]
        logits = logits[:, :-1].float()
        targets = labels[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none").view_as(targets)  # fmt: skip
        return (ce * self._token_weights(labels)).sum()

    def _global_sum(self, value):
        import torch

        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.acc.device)
        return float(self.acc.reduce(tensor, reduction="sum")) if self.world > 1 else float(tensor)

    # -- loop -----------------------------------------------------------------
    def run(self):
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        total = cfg.max_steps
        bar = tqdm(total=total, initial=self.start_step, disable=not (self.progress and acc.is_main_process),
                   desc="train", dynamic_ncols=True)  # fmt: skip
        self.model.train()
        t_start = time.perf_counter()
        for step in range(self.start_step, total):
            t0 = time.perf_counter()
            batches = self._micro_batches(step)
            norm = self._global_sum(sum(self._normaliser(b["labels"]) for b in batches))
            seq_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
            loss_sum = 0.0
            for i, batch in enumerate(batches):
                sync = i == len(batches) - 1
                ctx = contextlib.nullcontext() if sync else acc.no_sync(self.model)
                with ctx:
                    loss = self._loss_sum(batch)
                    # DDP averages gradients over processes; scale so the sum is global.
                    acc.backward(loss * self.world / max(norm, 1.0))
                loss_sum += float(loss.detach())
            if not batches:  # keep collective calls matched across processes
                acc.backward(sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad))
            if cfg.max_grad_norm:
                acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            loss_value = self._global_sum(loss_sum) / max(norm, 1.0)
            seq_tokens = self._global_sum(seq_tokens)
            dt = time.perf_counter() - t0
            entry = {
                "step": step + 1,
                "epoch": round((step + 1) * self.micro_per_step / self.n_batches, 4),
                "loss": loss_value,
                "lr": lr,
                "tokens": int(seq_tokens),
                "tokens_per_s": seq_tokens / dt if dt > 0 else None,
                "time": round(time.perf_counter() - t_start, 3),
            }
            self.log["steps"].append(entry)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{entry['tokens_per_s']:.0f}")
            done = step + 1
            if self.val_batches and (done % cfg.eval_every == 0 or done == total):
                self.log["eval"].append({"step": done, "val_loss": self.evaluate()})
                bar.set_postfix(loss=f"{loss_value:.4f}", val=f"{self.log['eval'][-1]['val_loss']:.4f}")
            if done % cfg.save_every == 0 or done == total:
                self.save_checkpoint(done)
            for callback in self.callbacks:
                callback(done, entry)
        bar.close()
        return self.finish()

    def evaluate(self):
        """Validation loss (same averaging as training) over the validation batches."""
        import torch

        self.model.eval()
        total, norm = 0.0, 0.0
        with torch.no_grad():
            for batch in self.val_batches:
                total += float(self._loss_sum(batch))
                norm += self._normaliser(batch["labels"])
        self.model.train()
        return self._global_sum(total) / max(self._global_sum(norm), 1.0)

    # -- saving ---------------------------------------------------------------
    def save_checkpoint(self, step):
        import torch

        acc = self.acc
        staging = self.checkpoints.staging(step)
        if acc.is_main_process:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        acc.wait_for_everyone()
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
        torch.save(rng, staging / f"rng-{acc.process_index}.pt")
        if acc.is_main_process:
            acc.unwrap_model(self.model).save_pretrained(staging, safe_serialization=True)
            self.tokenizer.save_pretrained(staging)
            torch.save(self.optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), staging / "scheduler.pt")
            state = {"step": step, "fingerprint": self.fingerprint, "log": self.log, "weights": hash_weights(staging)}
            (staging / STATE_NAME).write_text(json.dumps(state))
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.checkpoints.commit(step)
        acc.wait_for_everyone()

    def finish(self):
        """Write weights, tokenizer, training log and model card into the output directory."""
        acc = self.acc
        card = None
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            model = acc.unwrap_model(self.model)
            model.save_pretrained(self.out, safe_serialization=True)
            self.tokenizer.save_pretrained(self.out)
            (self.out / LOG_NAME).write_text(json.dumps(self.log, indent=1))
            card = self._card(model)
            card.record_weights(self.out)
            card.save_pretrained(self.out)
        acc.wait_for_everyone()
        if card is None:
            card = ModelCard.from_pretrained(self.out)
        return card

    def _card(self, model):
        from . import __version__

        cfg = self.cfg
        steps = self.log["steps"]
        tail = steps[-min(len(steps), 20):]
        final = {"train_loss": steps[-1]["loss"] if steps else None,
                 "train_loss_last20": float(np.mean([s["loss"] for s in tail])) if tail else None,
                 "val_loss": self.log["eval"][-1]["val_loss"] if self.log["eval"] else None,
                 "steps": cfg.max_steps}  # fmt: skip
        hyper = {k: v for k, v in asdict(cfg).items() if k not in ("extra", "base", "from_scratch", "quantize", "full")}
        hyper.update(world_size=self.world, global_batch_size=cfg.batch_size * self.micro_per_step,
                     optimizer="AdamW", schedule="cosine with linear warmup")  # fmt: skip
        if cfg.from_scratch:
            hyper["model_config"] = {k: v for k, v in SIZES[cfg.from_scratch].items()}
        if cfg.from_scratch or cfg.full:
            hyper["parameters"] = int(sum(p.numel() for p in model.parameters()))
        else:
            hyper["trainable_parameters"] = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
            targets = model.peft_config["default"].target_modules
            if isinstance(targets, (set, list, tuple)):  # "all-linear" resolves to full module paths
                targets = sorted({name.split(".")[-1] for name in targets})
            hyper["target_modules"] = targets
        return ModelCard(
            kind="full" if cfg.from_scratch or cfg.full else "lora",
            base_model=f"from-scratch:{cfg.from_scratch}" if cfg.from_scratch else cfg.base,
            prompts=self.template.to_dict(),
            cell_convention="primitive-niggli" if cfg.canonical else "as-read",
            tasks={"generation": 1 - cfg.infill_fraction, "infill": cfg.infill_fraction},
            training_data=self.data_record,
            validation_data=self.val_record or {},
            hyperparameters=json.loads(json.dumps(hyper)),
            loss_averaging=cfg.loss_averaging,
            final_losses=final,
            quantization=cfg.quantize,
            library_version=__version__,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            extra={"base": base_record(cfg.base)} if cfg.base else {},
        )


def _conditions(atoms):
    from .prompts import conditions_from_info

    return conditions_from_info(atoms.info)


def train(
    data,
    out,
    *,
    val=None,
    base=None,
    from_scratch=None,
    max_steps=None,
    epochs=None,
    batch_size=None,
    grad_accum=1,
    lr=None,
    warmup_steps=None,
    weight_decay=0.0,
    max_grad_norm=1.0,
    quantize=None,
    full=False,
    lora_rank=8,
    lora_alpha=32,
    lora_dropout=0.05,
    target_modules=None,
    loss_averaging="per_token",
    infill_fraction=1 / 3,
    max_length=None,
    eval_every=None,
    save_every=None,
    val_limit=512,
    seed=0,
    resume=False,
    limit=None,
    canonical=True,
    skip_bad=False,
    template=None,
    precision=None,
    cache=True,
    cache_dir=None,
    keep_checkpoints=2,
    progress=True,
    callbacks=(),
):
    """Train a crystal model and write it to ``out``; the Python side of ``crystal-llm train``.

    Parameters
    ----------
    data, val : str, path or list of ase.Atoms
        Training and validation structures: anything
        :func:`ase_crystal_llm.datasets.read_structures` reads, or structures.
    out : str or Path
        Output model directory (weights, tokenizer, ``crystal_llm.json``,
        ``training_log.json``, ``checkpoints/``).
    base : str, optional
        Hugging Face causal LM (hub id or local directory) to fine-tune with LoRA.
    from_scratch : str, optional
        Named LLaMA size (:data:`SIZES`) to train from scratch with the crystal tokenizer.
    max_steps, epochs
        Length of training in optimiser steps or passes (default one epoch).
    batch_size, grad_accum
        Examples per micro-batch per process, micro-batches per step.
    lr, warmup_steps, weight_decay, max_grad_norm
        AdamW with a cosine schedule after linear warmup.
    quantize : {"4bit", "8bit"}, optional
        Load the base quantised (QLoRA with NF4 for ``4bit``).
    full : bool
        Train every weight of ``base`` instead of a LoRA adapter (e.g. to
        continue training a model trained from scratch).
    lora_rank, lora_alpha, lora_dropout, target_modules
        LoRA settings; default targets are all linear projections of the
        attention and MLP blocks (peft's ``"all-linear"``).
    loss_averaging : {"per_token", "per_example"}
    infill_fraction : float
        Share of infill examples (paper: 1/3).
    template : PromptTemplate, optional
        Prompt wording; default the base's own when it was trained by this
        package (its card), else the paper's.
    eval_every, save_every : int
        Validation and checkpoint intervals in steps (also at the end).
    resume : bool
        Continue from the last checkpoint in ``out``.
    callbacks : iterable of callables
        Called as ``callback(step, log_entry)`` after every step.

    Returns
    -------
    ModelCard
        The card written to ``out``.
    """
    cfg = TrainConfig(
        base=base, from_scratch=from_scratch, quantize=quantize, full=full, max_steps=max_steps, epochs=epochs,
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, lora_rank=lora_rank,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
        loss_averaging=loss_averaging, infill_fraction=infill_fraction, max_length=max_length,
        eval_every=eval_every, save_every=save_every, val_limit=val_limit, seed=seed,
        canonical=canonical, limit=limit,
    ).resolve()  # fmt: skip
    out = Path(out)
    _check_out(out, resume)
    if cfg.base is not None:
        resolved = resolve_base(cfg.base)  # fail fast, before reading data
        if settings.named_base_file(cfg.base) is None:
            cfg.base = resolved  # a named base stays a name: the card then loads anywhere it is installed
        template = template or _base_template(resolved)
    structures, record = load_training_structures(
        data, canonical=canonical, limit=limit, skip_bad=skip_bad, cache=cache, cache_dir=cache_dir
    )
    val_structures, val_record = None, None
    if val is not None:
        val_structures, val_record = load_training_structures(
            val, canonical=canonical, limit=val_limit, skip_bad=skip_bad, cache=cache, cache_dir=cache_dir
        )
    trainer = _Trainer(
        cfg, out, structures, record, val_structures, val_record, template or PromptTemplate(),
        resume=resume, progress=progress, callbacks=callbacks, keep_checkpoints=keep_checkpoints,
        precision=precision or _default_precision(),
    )  # fmt: skip
    trainer.setup()
    return trainer.run()


def _base_template(base):
    """The prompts a base trained by this package was trained with (None for other models)."""
    card = Path(base) / CARD_NAME
    return ModelCard.from_pretrained(base).template if Path(base).is_dir() and card.is_file() else None


def _default_precision():
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _check_out(out, resume):
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    if resume:
        return
    if (out / CARD_NAME).is_file() or (out / CHECKPOINTS).is_dir():
        raise FileExistsError(
            f"{out} already holds a training run: pass --resume to continue it or choose another --out"
        )


# --------------------------------------------------------------------------- merging


def merge_adapter(model_dir, out_dir, *, base=None):
    """Merge a LoRA adapter into its base and save a full model directory.

    Parameters
    ----------
    model_dir : str or Path
        Adapter directory written by :func:`train`.
    out_dir : str or Path
        Where the merged model (full weights, tokenizer, card) goes.
    base : str, optional
        Location of the base model when it moved since training.

    Returns
    -------
    ModelCard
        The merged model's card (``kind="full"``).
    """
    import torch
    from peft import PeftModel

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    card = ModelCard.from_pretrained(model_dir)
    if card.kind != "lora":
        raise ValueError(f"{model_dir} holds full weights, not a LoRA adapter: nothing to merge")
    card.verify_weights(model_dir)
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError("merge output must be a different directory from the adapter")
    base = base or card.base_model
    check_base(card, base)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_base_model(base, device=device)  # never quantised: merge in full precision
    merged = PeftModel.from_pretrained(model, model_dir).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    new = ModelCard.from_dict({**card.to_dict(), "kind": "full", "weights": {}, "quantization": None})
    new.extra["merged_from"] = {"adapter": str(model_dir.resolve()), "base": str(base)}
    new.record_weights(out_dir)
    new.save_pretrained(out_dir)
    return new
