"""Loading models: base LMs (Hugging Face, GGUF, 4-bit), trained models and checkpoints.

* :func:`resolve_base` turns a name (``smollm2-135m``), a Hugging Face id, a
  folder or a ``.gguf`` file into what ``from_pretrained`` takes;
* :func:`load_base_model` / :func:`load_base_tokenizer`: the base, optionally
  quantised (bitsandbytes) for QLoRA;
* :func:`load_trained`: a trained folder (full weights or a LoRA adapter over
  its recorded base), its weights checked against the card's hashes;
* :func:`load_checkpoint` / :func:`checkpoints`: the checkpoints of a run;
* :func:`merge_adapter`: ``crystal-llm merge``, an adapter folded into its base.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ase_crystal_llm import settings
from ase_crystal_llm.model.modelcard import ModelCard, verify_hashes

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CHECKPOINTS", "STATE_NAME", "base_record", "check_base", "checkpoints", "load_base_model",
    "load_base_tokenizer", "load_checkpoint", "load_trained", "merge_adapter", "pretrained_args",
    "quiet_loading", "resolve_base",
]


STATE_NAME = "trainer_state.json"


CHECKPOINTS = "checkpoints"


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
    if settings.is_shipped_name(base):
        return _shipped_base(str(base))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise FileNotFoundError(f"base model file {path} is not a .gguf file: "
                                    "pass a .gguf file or a model directory")
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


def _shipped_base(name):
    """A shipped model as a base: only a full model (``default``) is one; an adapter names its own base."""
    folder = settings.model_folder(name)
    if not (folder / "config.json").is_file():
        base = ModelCard.from_pretrained(folder).base_model
        raise FileNotFoundError(f"{name!r} is a LoRA adapter, not a base model: continue it with "
                                f"--base {base} --adapter {name}")
    return str(folder.resolve())


def _weights_file(resolved):
    """The file whose hash identifies a resolved base: the GGUF file, or a folder's safetensors weights."""
    path = Path(resolved)
    if resolved.lower().endswith(".gguf"):
        return path
    weights = path / "model.safetensors"
    return weights if weights.is_file() else None


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
    """What the model card records of a base: its name as given and the sha256 of its weights file
    (a GGUF file, or a shipped model's ``model.safetensors``: such names change weights between releases)."""
    from ase_crystal_llm.model.modelcard import sha256_file

    resolved = resolve_base(base)
    record = {"name": str(base)}
    weights = _weights_file(resolved)
    if weights is not None and (weights.suffix == ".gguf" or settings.is_shipped_name(base)):
        record.update(file=weights.name, sha256=sha256_file(weights))
    return record


def check_base(card: ModelCard, base: str) -> None:
    """Refuse an adapter's base file that is not the one it was trained on."""
    from ase_crystal_llm.model.modelcard import ModelCardError, sha256_file

    expected = (card.extra.get("base") or {}).get("sha256")
    weights = _weights_file(resolve_base(base)) if expected else None
    if weights is not None and sha256_file(weights) != expected:
        raise ModelCardError(
            f"base model file {weights} is not the one this adapter was trained on (sha256 differs): "
            f"pass the original with --base"
        )


def _compute_dtype(device):
    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
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


def load_base_model(base: str, *, quantize: str | None = None, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> PreTrainedModel:
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

    from ase_crystal_llm.model.modelcard import sha256_file

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


def load_base_tokenizer(base: str) -> PreTrainedTokenizerBase:
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
    tokenizer.padding_side = "right"  # the saved default; decoding pads left per call (padding_side=)
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


def load_trained(model_dir: str | os.PathLike, *, base: str | None = None, device: str | torch.device | None = None,
                 quantize: str | None = None, verify: bool = True,
                 ) -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizerBase, ModelCard]:
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


def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The finished checkpoints of a training run, oldest first (``<run>/checkpoints/step-*``)."""
    root = Path(run_dir) / CHECKPOINTS
    found = sorted(root.glob("step-*")) if root.is_dir() else []
    return [p for p in found if (p / STATE_NAME).is_file()]


def load_checkpoint(checkpoint_dir: str | os.PathLike, *, base: str | None = None,
                    device: str | torch.device | None = None, base_model: PreTrainedModel | None = None,
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Load the model of one training checkpoint (to evaluate a learning curve).

    A checkpoint has no model card: its ``trainer_state.json`` says how the run
    was set up (from scratch, full weights over a base, or a LoRA adapter over
    ``base``, which overrides where the base lives now).  ``base_model``, an
    already loaded base, is copied instead of loading ``base`` again: a curve
    over many LoRA checkpoints loads its base once.

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

        if base_model is None:
            base_model = load_base_model(base or fingerprint["base"], device=device)
        else:  # merging writes into the base's weights: merge into a copy
            base_model = copy.deepcopy(base_model).to(device)
        model = PeftModel.from_pretrained(base_model, checkpoint_dir).merge_and_unload()
    return model.eval(), tokenizer, state


def merge_adapter(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, base: str | None = None) -> ModelCard:
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
