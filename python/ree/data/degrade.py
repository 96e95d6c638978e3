"""Very-low-resolution degradations: `degrade` for the synthetic set (numpy/PIL, one image) and
`synthesize_uis` for the unrecognizable instances made from each training batch (torch)."""
from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

_UPSAMPLE = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)


def degrade(image: np.ndarray, resolution: int, rng: np.random.Generator,
            output_size: int | None = None) -> np.ndarray:
    """A capture whose shorter side has `resolution` pixels, shown at the input size (or at
    output_size x output_size).

    Optical blur at the input scale, an anti-aliased (box) reduction, sensor noise, JPEG at the
    low resolution, then bilinear or bicubic interpolation back up. The blur, noise level, JPEG
    quality and interpolation are drawn from `rng`.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("image must be a uint8 numpy array of shape [H, W, 3], got "
                         f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
    height, width = image.shape[:2]
    shorter = min(height, width)
    if not 2 <= int(resolution) <= shorter:
        raise ValueError(f"resolution must be in [2, {shorter}] (the image's shorter side), got {resolution}")
    if output_size is not None and int(output_size) < 1:
        raise ValueError(f"output_size must be positive, got {output_size}")
    scale = int(resolution) / shorter
    low = (max(1, round(width * scale)), max(1, round(height * scale)))
    out = (width, height) if output_size is None else (int(output_size), int(output_size))
    blur, noise, quality, upsample = rng.random(4)
    picture = Image.fromarray(image)
    # Defocus of up to half a low-resolution pixel, on top of the reduction's own low-pass.
    sigma = float(blur * 0.5 / scale)
    if sigma > 0.2:
        picture = picture.filter(ImageFilter.GaussianBlur(sigma))
    small = np.asarray(picture.resize(low, Image.Resampling.BOX), np.float32)
    small = small + rng.standard_normal(small.shape, dtype=np.float32) * (noise * 8.0)
    picture = Image.fromarray(np.clip(small + 0.5, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=int(40 + quality * 55))
    picture = Image.open(buffer)
    picture = picture.resize(out, _UPSAMPLE[int(upsample * 2)])
    return np.asarray(picture.convert("RGB"))


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma (in pixels) per image, reflect padding."""
    n, c, h, w = images.shape
    radius = max(1, min(int(math.ceil(3.0 * float(sigma.max()))), (min(h, w) - 1)))
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (taps[None, :] / sigma[:, None].clamp_min(1e-3)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*c, taps]
    x = images.reshape(1, n * c, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=n * c)
    return x.reshape(n, c, h, w)


def synthesize_uis(images: torch.Tensor, generator: torch.Generator | None = None, *,
                   min_res: int = 4, max_res: int = 6, noise_std: float = 0.1) -> torch.Tensor:
    """Unrecognizable instances (UIs) made from a batch; they keep the batch's labels.

    Reconstructed (SPEC §1.10 [R]): the paper builds its UIs by degrading training images until
    they cannot be recognised; the exact recipe is not published. Here each image gets a
    Gaussian blur of the scale of the target pixel (sigma 0.5-1 target pixels), an area reduction
    to a size drawn in [min_res, max_res], Gaussian noise of standard deviation up to `noise_std`
    (in normalised units), then bilinear interpolation back to the input size, clamped to [-1, 1].

    images: float [N, 3, H, W] normalised to [-1, 1]; torch ops only, on the images' device.
    Random draws come from `generator` (any device; the default generator when None).
    """
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.ndim != 4:
        raise ValueError("images must be a floating tensor of shape [N, C, H, W], got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
    n, _, h, w = images.shape
    if not 1 <= min_res <= max_res <= min(h, w):
        raise ValueError(f"need 1 <= min_res <= max_res <= image size, got min_res={min_res}, "
                         f"max_res={max_res} for {h}x{w} images")
    if n == 0:
        return images.clone()
    draw_device = generator.device if generator is not None else images.device

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=draw_device).to(images.device, images.dtype)

    res = min_res + (uniform(n) * (max_res - min_res + 1)).long().clamp_max(max_res - min_res)
    sigma = (0.5 + 0.5 * uniform(n)) * min(h, w) / res.to(images.dtype)
    blurred = _gaussian_blur(images, sigma)
    noise_scale = noise_std * uniform(n)
    noise = torch.randn((n, images.shape[1], max_res, max_res), generator=generator,
                        device=draw_device).to(images.device, images.dtype)
    out = torch.empty_like(images)
    for r in range(min_res, max_res + 1):
        rows = (res == r).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        small = F.interpolate(blurred[rows], size=(r, r), mode="area")
        small = small + noise[rows, :, :r, :r] * noise_scale[rows, None, None, None]
        out[rows] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return out.clamp_(-1.0, 1.0)
