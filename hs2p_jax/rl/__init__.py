"""Reinforcement learning from a reward model: rollouts, estimators, learners."""
