"""Very-low-resolution degradations: `degrade` for the synthetic set (numpy/PIL, one image) and
`synthesize_uis` for the unrecognizable instances made from each training batch (torch)."""
from __future__ import annotations

import io
import math
from typing import NamedTuple

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


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.ndim != 4:
        raise ValueError("images must be a floating tensor of shape [N, C, H, W], got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")


def downsample(images: torch.Tensor, resolution: int | torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Very-low-resolution copies of a batch: each image reduced to resolution × resolution by an
    antialiased bilinear filter (the capture), then bicubic interpolation to size × size (what the
    model sees), clamped to [-1, 1]. The LFW-VLR probes and the VLR training augmentation.

    images: float [N, C, H, W] normalised to [-1, 1]; resolution: one int or an int tensor [N]
    (per image, each in [1, min(H, W)]); size: the output side (default H, for square images).
    An image whose resolution equals its size is returned unchanged.
    """
    _check_images(images)
    n, _, h, w = images.shape
    size = h if size is None else int(size)
    sides = torch.as_tensor(resolution).long().expand(n).tolist()  # one read of a device tensor
    if n and (min(sides) < 1 or max(sides) > min(h, w)):
        raise ValueError(f"resolution must lie in [1, {min(h, w)}], got {min(sides)}..{max(sides)}")
    out = images.new_empty(n, images.shape[1], size, size)
    for r in sorted(set(sides)):
        rows = torch.tensor([i for i, side in enumerate(sides) if side == r], device=images.device)
        x = images[rows]
        if r != h or r != w:
            x = F.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        out[rows] = x
    return out.clamp_(-1.0, 1.0)


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, widest: float) -> torch.Tensor:
    """Separable Gaussian blur with one sigma (in pixels) per image, reflect padding, the taps
    reaching 3 × `widest` (the largest sigma there can be, not the batch's: an image's blur then
    does not depend on the others in its batch)."""
    n, c, h, w = images.shape
    radius = max(1, min(int(math.ceil(3.0 * widest)), (min(h, w) - 1)))
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (taps[None, :] / sigma[:, None].clamp_min(1e-3)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*c, taps]
    x = images.reshape(1, n * c, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=n * c)
    return x.reshape(n, c, h, w)


class UIDraws(NamedTuple):
    """The random numbers `synthesize_uis` uses for n images, as drawn (float32 uniforms for the
    resolution, the blur and the noise level; standard normal noise [n, C, max_res, max_res]).
    `rows(index)` takes some of them: a rank of a multi-process run draws for the whole batch
    and keeps its own rows, so an image's UI does not depend on the number of ranks."""

    resolution: torch.Tensor
    blur: torch.Tensor
    noise_level: torch.Tensor
    noise: torch.Tensor

    def rows(self, index) -> "UIDraws":
        return UIDraws(*(x[index] for x in self))


def draw_uis(n: int, channels: int = 3, generator: torch.Generator | None = None, *, max_res: int = 6,
             device: torch.device | str | None = None) -> UIDraws:
    """The draws of `synthesize_uis` for n images of `channels` channels, from `generator` (on
    its device; the default generator on `device` when None)."""
    if generator is not None:
        device = generator.device
    uniform = [torch.rand(n, generator=generator, device=device) for _ in range(3)]
    noise = torch.randn((n, channels, max_res, max_res), generator=generator, device=device)
    return UIDraws(*uniform, noise)


def synthesize_uis(images: torch.Tensor, generator: torch.Generator | None = None, *,
                   min_res: int = 4, max_res: int = 6, noise_std: float = 0.1,
                   draws: UIDraws | None = None) -> torch.Tensor:
    """Unrecognizable instances (UIs) made from a batch; they keep the batch's labels.

    Reconstructed (docs/spec.md §1.10 [R]): the paper builds its UIs by degrading training images until
    they cannot be recognised; the exact recipe is not published. Here each image gets a
    Gaussian blur of the scale of the target pixel (sigma 0.5-1 target pixels), an area reduction
    to a size drawn in [min_res, max_res], Gaussian noise of standard deviation up to `noise_std`
    (in normalised units), then bilinear interpolation back to the input size, clamped to [-1, 1].

    images: float [N, 3, H, W] normalised to [-1, 1]; torch ops only, on the images' device.
    Random draws come from `generator` (any device; the default generator when None), or are
    the given `draws` (`draw_uis`, N rows, max_res wide): each image's UI depends only on its
    own draws.
    """
    _check_images(images)
    n, channels, h, w = images.shape
    if not 1 <= min_res <= max_res <= min(h, w):
        raise ValueError(f"need 1 <= min_res <= max_res <= image size, got min_res={min_res}, "
                         f"max_res={max_res} for {h}x{w} images")
    if draws is None:
        draws = draw_uis(n, channels, generator, max_res=max_res, device=images.device)
    elif draws.noise.shape != (n, channels, max_res, max_res):
        raise ValueError(f"draws must hold {n} rows of noise [{channels}, {max_res}, {max_res}], "
                         f"got {tuple(draws.noise.shape)}")
    if n == 0:
        return images.clone()

    def uniform(x: torch.Tensor) -> torch.Tensor:
        return x.to(images.device, images.dtype)

    res = min_res + (uniform(draws.resolution) * (max_res - min_res + 1)).long().clamp_max(max_res - min_res)
    sigma = (0.5 + 0.5 * uniform(draws.blur)) * min(h, w) / res.to(images.dtype)
    blurred = _gaussian_blur(images, sigma, widest=min(h, w) / min_res)
    noise_scale = noise_std * uniform(draws.noise_level)
    noise = draws.noise.to(images.device, images.dtype)
    out = torch.empty_like(images)
    for r in range(min_res, max_res + 1):
        rows = (res == r).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        small = F.interpolate(blurred[rows], size=(r, r), mode="area")
        small = small + noise[rows, :, :r, :r] * noise_scale[rows, None, None, None]
        out[rows] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return out.clamp_(-1.0, 1.0)
