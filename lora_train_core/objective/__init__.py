"""What a step optimises: training noise, timesteps, targets, and the weighted loss."""
