"""Interoperability with the reference implementation's checkpoints and configurations."""

from .reference import MappingReport, load_reference_state_dict, model_from_reference_config

__all__ = ["MappingReport", "load_reference_state_dict", "model_from_reference_config"]
