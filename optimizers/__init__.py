"""AdEMAMix and the learning-rate schedules."""

from optimizers.schedules import warmup_cosine_factor

__all__ = ["warmup_cosine_factor"]
