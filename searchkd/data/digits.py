"""scikit-learn's bundled 8×8 handwritten digits: the embedded, offline default.

1,797 images ship inside scikit-learn, so a search runs with no download. Pixel values
0…16 are rescaled to uint8 0…255. The test split is a fixed stratified 20% (seed 0), the
same for every search. Digits are not mirror-symmetric, so augmentation is a 1-pixel
random crop and no flip.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import ArrayDataset, register_dataset, stratified_split

TEST_FRACTION = 0.2  # the conventional 80/20 split; 359 test images
CROP_PADDING = 1  # 1 px of an 8 px image is the analogue of CIFAR's 4 px of 32


@register_dataset("digits")
def digits(root: str | None = None, download: bool = False) -> ArrayDataset:
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = np.round(raw.images * (255.0 / 16.0)).astype(np.uint8)
    x = torch.from_numpy(images)[:, None]  # N×1×8×8
    y = torch.from_numpy(raw.target.astype(np.int64))
    train, test = stratified_split(y, TEST_FRACTION, seed=0)
    mean = float(x[train].float().mean() / 255.0)  # statistics of the training images only
    std = float(x[train].float().std() / 255.0)
    return ArrayDataset(
        train_x=x[train],
        train_y=y[train],
        test_x=x[test],
        test_y=y[test],
        num_classes=10,
        mean=(mean,),
        std=(std,),
        crop_padding=CROP_PADDING,
        flip=False,
    )
