"""On-policy rollouts (GAE, value normalisation) and off-policy replay."""
