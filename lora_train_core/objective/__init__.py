"""What a step optimises: training noise, timesteps, targets, and the weighted loss.

noise.py and loss.py hold the DDPM (epsilon / v-prediction) objective; flow.py the flow-matching one.
"""
