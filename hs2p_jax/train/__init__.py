"""Training: a run's state and the one trainer on the one loop; reward models (regression, Bradley-Terry), DPO and SFT (RL: `hs2p_jax.rl`)."""
