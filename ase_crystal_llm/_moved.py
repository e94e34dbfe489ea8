"""Where the modules of 0.1 went: old import paths keep working for one release.

``import ase_crystal_llm.training`` (and the other flat modules of 0.1) still
works: a finder on ``sys.meta_path`` builds a module whose attributes are
looked up, on first use, in the subpackage that now holds them, with a
:class:`DeprecationWarning` naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings
from typing import Any

__all__ = ["MOVED", "moved_attribute"]

# old module -> {new module: names} (ase_crystal_llm.<old> before 0.2)
MOVED: dict[str, dict[str, tuple[str, ...]]] = {
    "aseio": {
        "io.ase_plugin": (
            "EXTENSION", "crystal_text_format", "read_crystal_text", "write_crystal_text",
        ),
    },
    "calculators": {
        "evaluation.batched": (
            "BatchEvaluator", "CHGNetBatchEvaluator", "MAX_VOLUME_RATIO", "MIN_DISTANCE",
            "MatglBatchEvaluator", "RelaxationFailed", "_CachedResults", "_GradientOnce", "_MAX_EIGVEC_COND",
            "_RelaxJob", "_check_sane", "_eig", "_evaluate_jobs", "_failed_copy", "_fast_cell_algebra",
            "_small_matrix_threads", "batch_evaluator", "eig_expm_frechet", "eig_logm", "run_batched",
        ),
        "evaluation.potentials": (
            "ENERGY_SCALES", "KNOWN_ANSWER_TOL", "NACL_A", "NACL_KNOWN_ANSWER", "NACL_REVERSED", "SEVENNET",
            "_chgnet_calculator", "_destination_conv_class", "_is_m3gnet_mp_2021", "_matgl_calculator",
            "_matgl_energy_scale", "_patch_destination_aggregation", "_quiet", "_sevennet_calculator",
            "_torch_device", "check_m3gnet_aggregation", "get_calculator", "load_chgnet",
            "load_matgl_potential", "nacl_energy_per_atom", "potential_info",
        ),
        "evaluation.relaxation": (
            "RelaxCache", "_WORKER", "_check_periodic", "_progress", "_relax_in_processes", "_relax_indices",
            "_restore_info", "_worker_init", "_worker_relax", "relax", "relax_key", "relax_many",
            "structure_hash",
        ),
    },
    "constraints": {
        "generation.constraints": (
            "CrystalGrammar", "CrystalLogitsProcessor", "DIGITS", "DONE", "EXTRA_ATOMS", "FIELDS",
            "FormulaTarget", "RowComposition", "START", "_FIRST_NUMBER", "_NEXT_LINE", "_TOKEN_STRINGS",
            "_anchor_id", "_capitalised", "_eos_ids", "_formula_reason", "_number_complete", "_prefixes",
            "can_end", "formula_composition", "reads_symbol", "step_char", "token_strings",
        ),
    },
    "data": {
        "data.download": (
            "CHUNK", "ChecksumError", "DataFile", "FileStatus", "M3GNET_DIR", "MANIFEST", "RECORD_NAME",
            "TIMEOUT", "_CDVAE", "_MATGL", "_REFERENCES", "_cdvae_to_csv_gz", "_download", "_fetch_one",
            "_m3gnet", "_matgl_model_files", "_mirror_base", "_mp20", "_one_line", "_open_url", "_place",
            "_place_from_matgl", "_record", "_sources", "_status", "_temporary", "_verify", "_write_record",
            "check", "default_dest", "describe_in_use", "fetch", "link", "missing", "read_record",
            "sha256_of",
        ),
    },
    "datasets": {
        "data.datasets": (
            "CANONICAL_CELL", "DatasetError", "_EXTENSIVE_INFO", "_FLOAT", "_INT", "_MAX_LISTED", "_MISSING",
            "_SAME_CELLPAR", "_STRUCTURE_COLUMNS", "_TEXT_COLUMNS", "_ase_atoms", "_ase_rows",
            "_atoms_from_cif", "_cif_file_rows", "_csv_atoms", "_csv_rows", "_db_atoms", "_db_rows",
            "_describe_site", "_energy_to_info", "_file_rows", "_guard_file", "_is_missing", "_kind",
            "_one_line", "_open_text", "_parse_cif", "_parse_value", "_raiser", "_source_names",
            "_structure_to_atoms", "_warn_skipped", "canonicalize", "iter_structures", "order_sites",
            "property_name", "read_structures",
        ),
    },
    "evaluation": {
        "evaluation.references": (
            "COVERAGE_SIZE", "FINGERPRINT_CHUNK", "FINGERPRINT_VERSION", "_DAMAGED", "_bar_description",
            "_compute_chunks", "_fingerprint_chunk", "_load_chunks", "_map_chunks", "_parse_cif",
            "_precomputed", "_read_cifs", "_reference", "_save_chunk", "_worker_init", "cache_dir",
            "precomputed_path", "reference_fingerprints", "subsample_rows",
        ),
        "evaluation.pipeline": (
            "IPT_SIZE", "REFERENCES", "SAMPLE_COLUMNS", "_Timer", "_bar", "_cache_rows", "_check_potential",
            "_count_reasons", "_coverage_size", "_distribution_metrics", "_formation_energy",
            "_load_language_model", "_median", "_per_structure", "_rate", "_relaxation_summary", "_spread",
            "_uniqueness_novelty", "_write_relaxed", "_write_samples_csv",
            "_write_samples_db", "check_structures", "e_above_hull_many", "evaluate", "model_ipt",
            "read_samples", "run_stats",
        ),
        "evaluation.report": (
            "_fmt", "_plots", "_reference_note", "_reference_sentence", "_subsampled", "report_markdown",
        ),
    },
    "generation": {
        "generation.generator": (
            "CrystalGenerator", "DEFAULT_MAX_ATOMS", "DEFAULT_MAX_ATTEMPTS", "DEFAULT_TEMPERATURE",
            "DEFAULT_TOP_P", "GenerationStats", "_card_get", "_check_conditions", "_check_elements",
            "_check_formula", "_check_request", "_default_device", "_seed_stream", "_symmetrize",
            "condition_sets", "failure_reason", "new_run_id", "seen_in_training", "whole_number",
        ),
        "generation.decoding": (
            "_BufferLayer", "_buffer_cache", "_cache_kwarg", "_choose", "_left_pad",
            "fast_sample", "plain_sample",
        ),
        "generation.workflow": (
            "_part_path", "_summary", "generate_to_file",
        ),
    },
    "hull": {
        "evaluation.hull": (
            "ELEMENTAL_REFERENCES", "LP_ABOVE", "MAX_ELEMENTS", "MP_SCALES", "ReferenceHull",
            "_OXIDATION_STATES", "_U_ANIONS", "_compatibility", "_counts", "_exclusion", "_formula",
            "_looks_like_formula", "_row_composition", "energy_scale_of", "load_elemental_references",
            "mp2020_correct", "mp2020_energy", "mp_run_parameters", "oxidation_state_guess",
            "total_energy_of",
        ),
    },
    "infill": {
        "ga.operators": (
            "LLMElementMutation", "TemplateElementMutation", "_ElementSwapMutation", "_child_info",
            "_element_groups", "mutate_structures", "swap_element",
        ),
        "chemistry.substitution": (
            "_all_ionic_radii", "_check_element", "_common_states", "_group_neighbours", "_ionic_radii",
            "_is_metal", "_radius", "_substitutes", "_usable", "oxidation_states", "substitutes",
            "swap_table", "template_candidates",
        ),
        "generation.infill": (
            "_candidate_list", "_check_temperature", "_encode", "_forward_kwargs", "_tempered_softmax",
            "element_log_likelihoods", "infill_prompt", "propose_elements",
        ),
    },
    "metrics": {
        "evaluation.metrics": (
            "COMP_CUTOFF", "COMP_FP_SIZE", "CompositionScaler", "Featurizer", "Fingerprints", "METASTABLE",
            "NoveltyIndex", "STRUCT_CUTOFF", "STRUCT_FP_SIZE", "SYMPRECS", "_CifLoader",
            "_attempts", "_emitted_entry", "_featurize_one", "_fits", "_pool_map", "conditional_accuracy",
            "conditions_of", "coverage", "diversity", "emitted_validity", "featurizer", "novelty_flags",
            "spacegroup_number", "stability_rates", "structure_matcher", "unique_flags", "wasserstein",
        ),
        "chemistry.validity": (
            "MIN_DISTANCE", "MIN_VOLUME", "OXIDATION_STATES", "_mean", "_neutral_reachable", "_reduced_key",
            "_smact_element", "_smact_valid_reduced", "_smact_validity", "as_atoms", "as_structure",
            "composition_valid", "counts_valid", "reduced_formula", "structure_valid", "validity_flags",
            "validity_rates",
        ),
        "model.scoring": (
            "answer_nll", "answer_perplexities", "ipt",
        ),
    },
    "modelcard": {
        "model.modelcard": (
            "CARD_NAME", "DEFAULT_SAMPLING", "FORMAT_VERSION", "ModelCard", "ModelCardError", "NUMBER_FORMAT",
            "WEIGHT_SUFFIXES", "hash_weights", "sha256_file", "verify_hashes", "weight_files",
        ),
    },
    "outputs": {
        "io.outputs": (
            "CIF_END", "DATA_KEYS", "DB_URL_SCHEMES", "FORMATS", "ID_KEYS", "StructureWriter", "_BACKENDS",
            "_CifBackend", "_CrystalTextBackend", "_DbBackend", "_ExtxyzBackend", "_TextBackend",
            "_TrajBackend", "_reads_as_number", "_record_key",
            "_session_last_id", "_stored_results", "check_output", "identifier", "is_cif_archive",
            "is_db_url", "merge_outputs", "output_format", "read_run_records", "run_record_path",
            "split_info", "write_cif_archive", "write_run_record",
        ),
    },
    "prompts": {
        "text.prompts": (
            "CONDITION_KEYS", "Example", "GENERATION", "INFILL", "INFO_TO_CONDITION", "PromptTemplate",
            "_default_sentences", "_is_missing", "conditions_from_info", "example_rng", "format_number",
            "make_example", "spacegroup_number",
        ),
    },
    "spacing": {
        "generation.spacing": (
            "FreeSites", "GRID", "MARGIN", "MAX_STEPS", "RowSpacing", "_axis", "blocked_steps",
            "coordinate_sites",
        ),
    },
    "text": {
        "text.format": (
            "CrystalTextError", "ELEMENTS", "LINE_SEPARATOR", "MASK", "MAX_ATOMS", "MAX_LENGTH", "MIN_VOLUME",
            "_ELEMENT_SET", "_NUMBER", "_as_rng", "_check_cell", "_crystal_lines", "_fmt", "_numbers",
            "atoms_to_text", "cell_volume", "is_element", "mask_element", "one_line", "split_crystals",
            "text_to_atoms", "wrap_fractional",
        ),
    },
    "tokenizer": {
        "text.tokenizer": (
            "SPECIAL_TOKENS", "_CHARS", "_SYMBOL_PATTERN", "_WORD", "_pattern", "build_tokenizer",
            "corpus_words", "tokenizer_for_template",
        ),
    },
    "training": {
        "model.loading": (
            "CHECKPOINTS", "STATE_NAME", "_base_errors", "_compute_dtype", "_forget_gguf_quantizer",
            "_gguf_as_directory", "_lora_config", "_missing_base_message", "_resolve_base_dir", "base_record",
            "check_base", "checkpoints", "load_base_model", "load_base_tokenizer", "load_checkpoint",
            "load_trained", "merge_adapter", "pretrained_args", "quiet_loading", "resolve_base",
        ),
        "model.encoding": (
            "EpochData", "IGNORE_INDEX", "_conditions", "_json_info", "_load_structure_cache", "_module_hash",
            "_read_source", "_save_structure_cache", "_sha256_files", "_source_files", "_structures_hash",
            "collate", "encode_example", "encode_examples", "load_training_structures",
        ),
        "model.training": (
            "LOG_NAME", "_Checkpoints", "_Trainer", "_base_template", "_check_out", "_default_precision",
            "_fingerprint", "train",
        ),
        "model.config": (
            "LOSS_AVERAGING", "MAX_POSITIONS", "SIZES", "TrainConfig", "_DEFAULTS", "count_parameters",
            "scratch_config",
        ),
    },
}
# Old module names that are now subpackages: their package __init__ forwards old names itself.
_PACKAGES = {"text", "data", "evaluation", "generation"}


def _new_home(old: str, name: str) -> str | None:
    for new, names in MOVED[old].items():
        if name in names:
            return new
    return None


def moved_attribute(old: str, name: str) -> Any:
    """Attribute ``name`` of the 0.1 module ``ase_crystal_llm.<old>``, from its new home."""
    new = _new_home(old, name)
    if new is None:
        raise AttributeError(f"module 'ase_crystal_llm.{old}' has no attribute {name!r}")
    warnings.warn(f"ase_crystal_llm.{old}.{name} moved to ase_crystal_llm.{new}.{name}; "
                  "the old path goes in the next release", DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(f"ase_crystal_llm.{new}"), name)


class _MovedLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return types.ModuleType(spec.name)

    def exec_module(self, module):
        old = module.__name__.rsplit(".", 1)[1]
        module.__getattr__ = lambda name: moved_attribute(old, name)
        module.__all__ = sorted(n for names in MOVED[old].values() for n in names if not n.startswith("_"))


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.rpartition(".")
        if package != "ase_crystal_llm" or old not in MOVED or old in _PACKAGES:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedLoader())


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
