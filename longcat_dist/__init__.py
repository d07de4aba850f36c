"""longcat-dist: distributed LoRA fine-tuning of LongCat-Video for image-to-video."""

__version__ = "0.1.0"
