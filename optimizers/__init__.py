"""AdEMAMix and the learning-rate schedules."""

from optimizers.ademamix import AdEMAMix
from optimizers.schedules import alpha_schedule, beta3_schedule, warmup_cosine_factor

__all__ = ["AdEMAMix", "alpha_schedule", "beta3_schedule", "warmup_cosine_factor"]
