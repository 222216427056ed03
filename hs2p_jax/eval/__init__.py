"""Evaluation: RewardBench-style scoring of reward models."""
