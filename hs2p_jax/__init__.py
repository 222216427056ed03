"""hs2p-jax: HelpSteer2-Preference reward models, ExPO and REINFORCE in JAX."""

__version__ = "0.1.0"
