"""Data-dependent start for a random (not pretrained) encoder: its frozen BatchNorms get the training images' statistics.

With torchvision's default statistics (mean 0, variance 1), which are not those of random convolutions' outputs, the
frozen features a random encoder feeds its trainable stages (and the feature cache) are mis-scaled: the stem's outputs
have a variance near 0.1, and training starts slower. Pretrained encoders keep their ImageNet statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from caption_model import ImageCaptioner
from caption_model.modeling import ImageEncoder
from caption_model.training.config import TrainConfig
from caption_model.training.feature_cache import decode_image

logger = logging.getLogger(__name__)


@torch.no_grad()
def calibrate_frozen_batchnorm(encoder: ImageEncoder, pixel_batches: Iterable[torch.Tensor]) -> int:
    """Set the frozen stages' BatchNorm statistics to those of the images in `pixel_batches` ((B, 3, S, S) tensors);
    returns the number of images seen. The trainable stages keep theirs; every BatchNorm ends in eval mode."""
    frozen = encoder.stages()[: encoder.num_frozen_stages]
    norms = [m for stage in frozen for m in stage.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over every batch, not an exponential one
        norm.train()
    seen = 0
    try:
        for pixels in pixel_batches:
            x = pixels
            for stage in frozen:
                x = stage(x)
            seen += pixels.shape[0]
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
            norm.eval()
    return seen


def calibrate_random_encoder(model: ImageCaptioner, train, cfg: TrainConfig) -> None:
    """A random encoder's frozen stages get the BatchNorm statistics of the first `calibrate_batchnorm_images`
    training images (data-dependent initialisation); a pretrained one keeps its ImageNet statistics."""
    count = min(cfg.calibrate_batchnorm_images, len(train))
    if cfg.encoder_weights is not None or count <= 0 or model.encoder.num_frozen_stages == 0:
        return
    images = list(train.select(range(count))["image"])
    batches = (model.preprocess([decode_image(im) for im in images[i:i + cfg.batch_size]]).to(model.device)
               for i in range(0, count, cfg.batch_size))
    seen = calibrate_frozen_batchnorm(model.encoder, batches)
    logger.info("random encoder: frozen BatchNorm statistics set from %d training images", seen)
