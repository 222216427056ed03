"""Checkpoint conversion: Hugging Face Llama directories and GGUF files to and from this project's models."""

from hs2p_jax.convert.gguf import gguf_config, load_gguf, smollm2_path
from hs2p_jax.convert.hf import load_hf
from hs2p_jax.convert.hf_export import export_hf

__all__ = ["export_hf", "gguf_config", "load_gguf", "load_hf", "smollm2_path"]
