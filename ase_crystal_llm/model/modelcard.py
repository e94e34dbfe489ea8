"""The model card: everything generation needs to know about how a model was trained.

A card is a JSON file, ``crystal_llm.json``, in the model directory.  It is
data, never code: it names the base model, stores the exact prompt wording,
the number formatting and cell convention of the crystal text, the training
data (hash and size), hyper-parameters, loss averaging, final losses,
recommended sampling settings, and the sha256 of every weight file, which
:meth:`ModelCard.verify_weights` checks before a model is loaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ase_crystal_llm.io.files import atomic_write, sha256_file
from ase_crystal_llm.text.prompts import PromptTemplate

if TYPE_CHECKING:
    import os
    from collections.abc import Mapping

__all__ = [
    "CARD_NAME", "DEFAULT_SAMPLING", "DEFAULT_TEMPERATURE", "DEFAULT_TOP_P", "FORMAT_VERSION", "ModelCard",
    "ModelCardError", "NUMBER_FORMAT", "WEIGHT_SUFFIXES", "hash_weights", "sha256_file", "verify_hashes",
    "weight_files",
]


CARD_NAME = "crystal_llm.json"


FORMAT_VERSION = 1


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


# Sampling a card recommends unless training records otherwise; the generator falls back to them.
DEFAULT_TEMPERATURE = 0.7


DEFAULT_TOP_P = 0.9


DEFAULT_SAMPLING = {"temperature": DEFAULT_TEMPERATURE, "top_p": DEFAULT_TOP_P}


# How text.atoms_to_text writes numbers; recorded so that a reader can check.
NUMBER_FORMAT = {
    "lengths_decimals": 1,
    "angles_decimals": 0,
    "angles": "rounded",
    "fractional_decimals": 2,
    "fractional_range": "[0, 1)",
    "condition_decimals": 4,
}


class ModelCardError(ValueError):
    """A missing, unreadable or inconsistent model card or weight file."""


def weight_files(model_dir: str | os.PathLike) -> list[str]:
    """Weight files directly inside ``model_dir`` (not checkpoints), sorted."""
    model_dir = Path(model_dir)
    return sorted(p.name for p in model_dir.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def hash_weights(model_dir: str | os.PathLike) -> dict[str, str]:
    """File name -> sha256 of every weight file in ``model_dir``."""
    return {name: sha256_file(Path(model_dir) / name) for name in weight_files(model_dir)}


def verify_hashes(model_dir: str | os.PathLike, weights: Mapping[str, str]) -> None:
    """Raise :class:`ModelCardError` unless every file in ``weights`` exists with its sha256."""
    for name, expected in weights.items():
        path = Path(model_dir) / name
        if not path.is_file():
            raise ModelCardError(f"weight file missing: {path}")
        if sha256_file(path) != expected:
            raise ModelCardError(f"weight file corrupt or replaced (sha256 mismatch): {path}")


@dataclass
class ModelCard:
    """What a trained crystal model is and how it was made.

    Attributes
    ----------
    kind : str
        ``"full"`` (complete weights) or ``"lora"`` (a peft adapter over ``base_model``).
    base_model : str or None
        Hugging Face id or path of the base (LoRA), or ``"from-scratch:<size>"``.
    prompts : dict
        :meth:`PromptTemplate.to_dict` of the template used in training.
    weights : dict
        File name -> sha256 of every weight file in the model directory.
    """

    kind: str = "full"
    base_model: str | None = None
    format_version: int = FORMAT_VERSION
    prompts: dict = field(default_factory=lambda: PromptTemplate().to_dict())
    number_format: dict = field(default_factory=lambda: dict(NUMBER_FORMAT))
    cell_convention: str = "primitive-niggli"
    tasks: dict = field(default_factory=lambda: {"generation": 2 / 3, "infill": 1 / 3})
    training_data: dict = field(default_factory=dict)
    validation_data: dict = field(default_factory=dict)
    hyperparameters: dict = field(default_factory=dict)
    loss_averaging: str = "per_token"
    final_losses: dict = field(default_factory=dict)
    sampling: dict = field(default_factory=lambda: dict(DEFAULT_SAMPLING))
    weights: dict = field(default_factory=dict)
    quantization: str | None = None
    library_version: str | None = None
    created: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def template(self) -> PromptTemplate:
        """The :class:`PromptTemplate` the model was trained with."""
        return PromptTemplate.from_dict(self.prompts)

    # -- files --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        if not isinstance(data, dict):
            raise ModelCardError("model card must be a JSON object")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ModelCardError(
                f"model card format version {version!r} is not supported (this version reads <= {FORMAT_VERSION})"
            )
        known = {f.name for f in fields(cls)}
        extra = {k: v for k, v in data.items() if k not in known}
        card = cls(**{k: v for k, v in data.items() if k in known})
        card.extra.update(extra)
        if card.kind not in ("full", "lora"):
            raise ModelCardError(f"model card kind must be 'full' or 'lora', got {card.kind!r}")
        _ = card.template  # a property: building it fails early on a broken prompt entry
        return card

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> ModelCard:
        """Read ``crystal_llm.json`` from a model directory."""
        path = Path(model_dir) / CARD_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no model card {CARD_NAME} in {model_dir}: not a crystal-llm model directory")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelCardError(f"unreadable model card {path}: {err}") from err
        try:
            return cls.from_dict(data)
        except TypeError as err:
            raise ModelCardError(f"invalid model card {path}: {err}") from err

    def save_pretrained(self, model_dir: str | os.PathLike) -> Path:
        """Write the card atomically (temporary file, then rename)."""
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        path = model_dir / CARD_NAME
        atomic_write(path, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path

    # -- weights ------------------------------------------------------------
    def record_weights(self, model_dir: str | os.PathLike) -> dict[str, str]:
        """Store the sha256 of every weight file now in ``model_dir``."""
        self.weights = hash_weights(model_dir)
        return self.weights

    def verify_weights(self, model_dir: str | os.PathLike) -> bool:
        """Check every weight file named in the card exists and matches its sha256.

        Raises
        ------
        ModelCardError
            On a card that names no weights, a missing file or a hash mismatch.
        """
        if not self.weights:
            raise ModelCardError(f"model card in {model_dir} lists no weight files")
        verify_hashes(model_dir, self.weights)
        return True
