"""Data: records -> examples (HelpSteer2, preference pairs, prompts) -> templated token batches.

Modules: records (raw rows of files and the hub), fields (record field checks), examples (example
types, LoadReport), helpsteer2 / pairs / prompts (schemas -> examples), load (format dispatch),
templates (SteerLM and chat formats), encode (tokens, over-long policy), batching (padding,
packing), order (shards, shuffles), pipeline (`make_loader`), synthetic (built-in data).
"""

from hs2p_jax.data.batching import padding_fraction
from hs2p_jax.data.examples import LoadReport, PairExample, PromptExample, RatingExample
from hs2p_jax.data.load import load_examples
from hs2p_jax.data.pipeline import Loader, make_loader
from hs2p_jax.data.records import read_records
from hs2p_jax.data.synthetic import resolve_source, write_builtin

__all__ = ["LoadReport", "Loader", "PairExample", "PromptExample", "RatingExample", "load_examples", "make_loader",
           "padding_fraction", "read_records", "resolve_source", "write_builtin"]
