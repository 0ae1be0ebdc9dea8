"""Batched train augmentation (random zero-padded crop, horizontal flip) and normalisation, on the training
device, with all randomness drawn from an explicit ``torch.Generator`` so that runs are reproducible."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mutualkd.data.datasets import DataSpec
from mutualkd.errors import UserError


def _crop_flip(images: torch.Tensor, padding: int, top: torch.Tensor, left: torch.Tensor,
               flip: torch.Tensor | None) -> torch.Tensor:
    """Per-sample crop of the zero-padded images at (top, left), then optional horizontal flip.

    One advanced-indexing gather; flipping just reverses the gathered column indices.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4) if padding else images
    dev = images.device
    rows = top[:, None] + torch.arange(h, device=dev)  # [B, H]
    cols = left[:, None] + torch.arange(w, device=dev)  # [B, W]
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    return padded[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


class BatchAugment:
    """Batched train augmentation (random zero-padded crop, horizontal flip) plus normalisation.

    Randomness comes only from the ``generator`` passed in, which must live on the images' device
    (``None`` uses torch's default generator of that device), so results are reproducible from its state.
    """

    def __init__(self, spec: DataSpec, crop_padding: int | None = None, flip: bool | None = None) -> None:
        self.spec = spec
        self.crop_padding = spec.crop_padding if crop_padding is None else crop_padding
        self.flip = spec.flip if flip is None else flip
        if self.crop_padding < 0:
            raise UserError(f"data.crop_padding: must be >= 0, got {self.crop_padding}")
        self._affine: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _sample_params(self, n: int, device: torch.device, generator: torch.Generator | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Draw (top, left) crop offsets in [0, 2*padding] and the flip mask for n samples."""
        offsets = torch.randint(0, 2 * self.crop_padding + 1, (2, n), device=device, generator=generator)
        flip = torch.rand(n, device=device, generator=generator) < 0.5 if self.flip else None
        return offsets[0], offsets[1], flip

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> float32 ``(x/255 - mean) / std``, as one multiply-add with per-device cached constants."""
        if images.device not in self._affine:
            mean = torch.tensor(self.spec.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
            std = torch.tensor(self.spec.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
            self._affine[images.device] = (1 / (255 * std), -mean / std)
        scale, shift = self._affine[images.device]
        return torch.addcmul(shift, images.float(), scale)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None, train: bool) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != len(self.spec.mean):
            raise ValueError(f"expected uint8 [B,{len(self.spec.mean)},H,W], got {images.dtype} {tuple(images.shape)}")
        if train and (self.crop_padding or self.flip):
            top, left, flip = self._sample_params(len(images), images.device, generator)
            images = _crop_flip(images, self.crop_padding, top, left, flip)
        return self._normalise(images)

    def views(self, images: torch.Tensor, n: int, generator: torch.Generator | None) -> list[torch.Tensor]:
        """n independently augmented training views of the same batch (one per peer)."""
        return [self(images, generator, train=True) for _ in range(n)]
