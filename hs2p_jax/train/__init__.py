"""Training: reward models (regression, Bradley-Terry) and REINFORCE."""
