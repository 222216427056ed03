"""Throughput measurement of the reward-model step, the sampler and the data pipeline, beside the same
work in PyTorch/transformers (`hs2p bench`, benchmarks/)."""
