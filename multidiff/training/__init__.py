"""Training: the denoising loss (time sampling and weighting for every process and prediction)."""
from .loss import TIME_SAMPLINGS, WEIGHTINGS, DenoisingLoss, LossHistory, LossOutput, sensitivity2

__all__ = ["DenoisingLoss", "LossOutput", "LossHistory", "WEIGHTINGS", "TIME_SAMPLINGS", "sensitivity2"]
