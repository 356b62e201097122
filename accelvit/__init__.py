"""accelvit: cheaper self-supervised ViT pretraining through sequence-compression curricula.

Token dropout and patch scaling shorten the token sequences a ViT processes early in training and
restore them later (Lin et al., "Accelerating Augmentation Invariance Pretraining", NeurIPS 2024).
"""

__version__ = "0.1.0"
