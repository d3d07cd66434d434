"""Image captioning with a ResNet-50 encoder, a causal BERT fusion decoder and a heatmap per word.

    from caption_model import ImageCaptioner
    captioner = ImageCaptioner.from_pretrained("user/repo" or "path/to/checkpoint")
    out = captioner.caption("photo.jpg", num_beams=3)   # out.text, out.words, out.attention, out.score
"""

from ._version import __version__
from .captioner import ImageCaptioner
from .config import CaptionerConfig
from .generation import Caption

__all__ = ["Caption", "CaptionerConfig", "ImageCaptioner", "__version__"]
