"""`hs2p serve`: a reward model behind HTTP (OpenRLHF's `/get_reward`, vLLM's `/classify`)."""
