"""Procedural face renderer behind the synthetic set (numpy, vectorised over a batch).

Faces are drawn in a canonical frame (u right, v down, both in [-1, 1]; the head is centred,
about 0.5 wide and 0.62 high in half-extents). An identity fixes everything that makes a
person: head and jaw shape, skin tone and skin texture (blotches, freckles, moles), ears, hair
colour, volume, hairline, length and texture, beard, glasses, brow shape, eye spacing, size,
aspect and iris colour, nose size and mouth shape. What is drawn once per identity (`identity
base`) is reused by all its samples; each sample then adds its expression (eyelids, gaze, brows,
smile, open mouth), is warped by its pose (roll, scale, shift and a yaw that moves points by
their depth on an ellipsoid, the nose most) into the image frame, lit (Lambert on the ellipsoid,
ambient level, colour cast, gamma, a brightness ramp) and put over a random background and torso.

All parameters come from uniform draws, one row of `ID_PARAMS` / `SAMPLE_PARAMS` numbers per
identity / sample, so a seed fixes every image.
"""
from __future__ import annotations

import numpy as np

ID_PARAMS = 48  # uniform numbers drawn per identity
SAMPLE_PARAMS = 34  # uniform numbers drawn per sample
ID_TEXTURE = (6, 16)  # grid sizes of the identity's skin / hair / beard noise fields
SAMPLE_TEXTURE = 4  # grid size of the background field

_ZOOM = 1.3  # canonical to image scale: a tight crop, the head fills most of the picture
_HAIR = np.array([[25, 20, 18], [55, 38, 26], [95, 65, 40], [130, 62, 30], [195, 160, 100],
                  [150, 145, 140], [80, 55, 45]], np.float32) / 255
_IRIS = np.array([[60, 35, 20], [110, 70, 35], [120, 110, 50], [70, 110, 70], [70, 110, 160],
                  [110, 120, 130]], np.float32) / 255
_SKIN_LIGHT = np.array([236, 200, 176], np.float32) / 255
_SKIN_DARK = np.array([92, 58, 42], np.float32) / 255


def _lerp(lo: float, hi: float, t: np.ndarray) -> np.ndarray:
    return (lo + (hi - lo) * t).astype(np.float32)


def _interp_matrix(size: int, grid: int) -> np.ndarray:
    """[size, grid] bilinear interpolation of a grid of values spread over the whole image."""
    x = (np.arange(size) + 0.5) / size * (grid - 1)
    i0 = np.minimum(np.floor(x).astype(int), grid - 2)
    w = (x - i0).astype(np.float32)
    m = np.zeros((size, grid), np.float32)
    m[np.arange(size), i0] = 1 - w
    m[np.arange(size), i0 + 1] = w
    return m


def _field(noise: np.ndarray, size: int) -> np.ndarray:
    """Smooth random field [n, size, size] from noise grids [n, g, g] (bilinear upsampling)."""
    m = _interp_matrix(size, noise.shape[-1])
    return np.einsum("ia,nab,jb->nij", m, noise.astype(np.float32), m, optimize=True)


def _soft(distance: np.ndarray, pixel: float) -> np.ndarray:
    """Coverage of a shape from a signed distance (negative inside), anti-aliased over a pixel."""
    return np.clip(0.5 - distance / pixel, 0.0, 1.0)


def _ellipse(du: np.ndarray, dv: np.ndarray, a, b, pixel: float) -> np.ndarray:
    """Coverage of the ellipse with half-axes a, b centred at du = dv = 0."""
    q = np.sqrt((du / a) ** 2 + (dv / b) ** 2)
    return _soft((q - 1.0) * np.minimum(a, b), pixel)


def _paint(rgba: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    """Draws an opaque `colour` [n, 3] or [n, H, W, 3] with coverage `mask` over premultiplied rgba."""
    m = mask[..., None]
    colour = colour if colour.ndim == 4 else colour[:, None, None, :]
    rgba[..., :3] += m * (colour - rgba[..., :3])
    rgba[..., 3:] += m * (1.0 - rgba[..., 3:])


def _shade(rgba: np.ndarray, mask: np.ndarray, factor) -> None:
    """Multiplies the colour under `mask` by `factor` (darkening below 1)."""
    rgba[..., :3] *= 1.0 + (mask * (np.asarray(factor, np.float32) - 1.0))[..., None]


class Identities:
    """Identity parameters mapped from the uniform draws `p` [n, ID_PARAMS] and noise grids."""

    def __init__(self, p: np.ndarray, skin_noise: np.ndarray, fine_noise: np.ndarray):
        c = lambda i: p[:, i, None, None]  # broadcast against [n, H, W]  # noqa: E731
        self.n = len(p)
        self.head_w, self.head_h = _lerp(0.43, 0.55, c(0)), _lerp(0.56, 0.68, c(1))
        self.jaw = _lerp(0.05, 0.4, c(2))
        tone = p[:, 3, None] ** 1.3
        self.skin = (_SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * tone
                     + np.stack([p[:, 4] - 0.5, np.zeros(self.n), 0.5 - p[:, 4]], 1) * 0.08).astype(np.float32)
        self.blotch = _lerp(0.02, 0.09, c(5))
        self.freckles = (p[:, 6, None, None] < 0.25) * _lerp(0.1, 0.25, c(7))
        self.moles = [(_lerp(-0.35, 0.35, c(8 + 3 * k)), _lerp(-0.3, 0.45, c(9 + 3 * k)),
                       _lerp(0.012, 0.035, c(10 + 3 * k)) * (c(10 + 3 * k) < 0.55)) for k in range(3)]
        self.ear_v, self.ear_size = _lerp(-0.1, 0.05, c(17)), _lerp(0.8, 1.25, c(17))
        hair = _HAIR[np.minimum((p[:, 18] * len(_HAIR)).astype(int), len(_HAIR) - 1)]
        self.hair = np.clip(hair * _lerp(0.8, 1.2, p[:, 19, None]), 0, 1)
        self.bald = c(20) < 0.07
        self.volume = _lerp(0.03, 0.2, c(21))
        self.hairline = np.where(self.bald, -2.0, _lerp(-0.62, -0.3, c(22)))
        self.hair_curve = _lerp(-0.3, 0.9, c(23))
        self.hair_part = _lerp(-0.35, 0.35, c(24))
        self.side_v = _lerp(-0.3, 0.15, c(25))
        self.long_v = np.where(c(26) < 0.35, _lerp(0.2, 0.95, c(27)), -2.0)
        self.hair_freq, self.hair_angle = _lerp(25, 60, c(28)), _lerp(0.8, 2.3, c(29))
        self.beard = (c(30) < 0.18) * _lerp(0.5, 0.9, c(31))
        self.moustache = np.maximum(self.beard, (c(32) < 0.1) * 0.8)
        self.glasses = p[:, 33, None, None] < 0.12
        self.eye_u, self.eye_v = _lerp(0.16, 0.25, c(34)), _lerp(-0.13, -0.02, c(35))
        self.eye_a = _lerp(0.065, 0.095, c(36))
        self.eye_b = self.eye_a * _lerp(0.38, 0.62, c(37))
        iris = _IRIS[np.minimum((p[:, 38] * len(_IRIS)).astype(int), len(_IRIS) - 1)]
        self.iris = np.clip(iris * _lerp(0.8, 1.2, p[:, 39, None]), 0, 1)
        self.brow_gap, self.brow_thick = _lerp(0.08, 0.14, c(40)), _lerp(0.018, 0.045, c(41))
        self.brow_len, self.brow_arch = _lerp(0.07, 0.12, c(42)), _lerp(-0.01, 0.045, c(43))
        self.brow_tilt = _lerp(-0.25, 0.2, c(44))
        self.nose_v, self.nose_w = _lerp(0.1, 0.25, c(45)), _lerp(0.05, 0.1, c(46))
        self.mouth_v = self.nose_v + _lerp(0.12, 0.2, c(47))
        self.mouth_w = _lerp(0.12, 0.21, c(0) * 0.5 + c(36) * 0.5)  # wider faces, wider eyes
        self.lip_thick = _lerp(0.018, 0.04, c(5) * 0.3 + c(37) * 0.7)
        self.lip = (self.skin * 0.6 + np.array([0.55, 0.18, 0.2], np.float32) * 0.4).astype(np.float32)
        self.skin_noise, self.fine_noise = skin_noise, fine_noise

    def take(self, index: np.ndarray) -> "Identities":
        """The identities of a batch of samples (index into this set)."""
        out = object.__new__(Identities)
        for name, value in vars(self).items():
            if name == "moles":
                value = [tuple(x[index] for x in mole) for mole in value]
            elif isinstance(value, np.ndarray) and value.shape[:1] == (self.n,):
                value = value[index]
            setattr(out, name, value)
        out.n = len(index)
        return out


def _canonical_grid(size: int) -> tuple[np.ndarray, np.ndarray, float]:
    t = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1)
    return t[None, None, :], t[None, :, None], 2.0 / size


def render_identities(ids: Identities, size: int) -> np.ndarray:
    """What never changes for an identity, premultiplied RGBA float32 [n, size, size, 4]."""
    u, v, px = _canonical_grid(size)
    n = ids.n
    rgba = np.zeros((n, size, size, 4), np.float32)
    hw, hh = ids.head_w, ids.head_h
    outer_w, outer_h = hw + ids.volume, hh + ids.volume * 0.8
    # Long hair hangs behind the head and the neck.
    long_hair = _soft(np.abs(u) - outer_w * (1.0 - 0.2 * np.clip(v, 0, 1)), px) \
        * _soft(v - ids.long_v, px) * _soft(-v, px)
    _paint(rgba, long_hair, ids.hair * 0.8)
    neck = _soft(np.abs(u) - hw * 0.55, px) * _soft(0.25 - v, px)
    _paint(rgba, neck, ids.skin * 0.8)
    au = np.abs(u)
    ears = _ellipse(au - hw * 0.97, v - ids.ear_v, 0.065 * ids.ear_size, 0.12 * ids.ear_size, px)
    _paint(rgba, ears, ids.skin * 0.92)
    jaw_w = hw * (1.0 - ids.jaw * np.clip(v / hh, 0, 1) ** 2)
    head = _ellipse(u, v, jaw_w, hh, px)
    skin_field = _field(ids.skin_noise, size)
    fine = _field(ids.fine_noise, size)
    skin = ids.skin[:, None, None, :] * (1.0 + ids.blotch * skin_field)[..., None]
    freckle = ids.freckles * np.clip(fine * 4.0 - 3.5, 0, 1) * _soft(np.abs(v - 0.05) - 0.18, px)
    skin = skin * (1.0 - freckle[..., None])
    _paint(rgba, head, skin)
    for mu, mv, mr in ids.moles:
        _shade(rgba, head * _ellipse(u - mu, v - mv, mr + 1e-4, mr + 1e-4, px), 0.45)
    # Nose: nostrils, the shadow under the tip and along one side, a highlight on the tip.
    nv, nw = ids.nose_v, ids.nose_w
    _shade(rgba, _ellipse(au - nw * 0.5, v - nv, 0.026, 0.016, px), 0.45)
    _shade(rgba, _ellipse(u, v - nv - 0.035, nw * 0.9, 0.02, px), 0.82)
    side = _soft(np.abs(u + nw * 0.55) - 0.018, px) * _soft(v - nv, px) * _soft(ids.eye_v + 0.03 - v, px)
    _shade(rgba, side, 0.88)
    _shade(rgba, _ellipse(u, v - nv + 0.03, nw * 0.55, 0.05, px), 1.1)
    # Beard and moustache, with a coarse hair texture.
    strands = 0.75 + 0.5 * np.clip(fine, -0.5, 0.5)
    beard = ids.beard * head * _soft(ids.mouth_v - 0.06 - v + 0.25 * u ** 2, px)
    _paint(rgba, beard, ids.hair[:, None, None, :] * strands[..., None])
    tache = ids.moustache * _soft(np.abs(v - (nv + ids.mouth_v) * 0.5 - 0.005) - 0.022, px) \
        * _soft(au - ids.mouth_w * 1.05, px)
    _paint(rgba, tache, ids.hair[:, None, None, :] * strands[..., None])
    # Hair over the head: the top above the hairline, the sides above side_v.
    outer = _ellipse(u, v + ids.volume * 0.5, outer_w, outer_h, px)
    hairline = ids.hairline + ids.hair_curve * u ** 2 + ids.hair_part * u
    side_v = np.where(ids.long_v > 0, np.maximum(ids.side_v, 0.3), ids.side_v)  # long hair frames the face
    sides = (1.0 - head) * _soft(v - side_v, px) * (1.0 - ids.bald * 0.6)
    top = np.maximum(_soft(v - hairline, px), sides) * outer
    along = u * np.cos(ids.hair_angle) + v * np.sin(ids.hair_angle)
    stripes = 0.9 + 0.1 * np.clip(fine, -1, 1) + 0.08 * np.sin(ids.hair_freq * along
                                                                + 4.0 * skin_field)
    _paint(rgba, top, ids.hair[:, None, None, :] * stripes[..., None])
    return rgba


class Samples:
    """Per-sample expression, pose, light and background from uniform draws `p` [n, SAMPLE_PARAMS]."""

    def __init__(self, p: np.ndarray, background_noise: np.ndarray):
        c = lambda i: p[:, i, None, None]  # noqa: E731
        self.n = len(p)
        self.eye_open = np.where(c(0) < 0.05, 0.12, _lerp(0.55, 1.1, c(1)))
        self.gaze_u, self.gaze_v = _lerp(-0.35, 0.35, c(2)), _lerp(-0.2, 0.2, c(3))
        self.brow_raise, self.frown = _lerp(-0.025, 0.045, c(4)), _lerp(-0.1, 0.2, c(5))
        self.smile = _lerp(-0.3, 1.0, c(6))
        self.mouth_open = np.where(c(7) < 0.35, _lerp(0.2, 1.0, c(8)), 0.0)
        self.roll = _lerp(-0.25, 0.25, (c(9) + c(10)) * 0.5)  # radians, triangular around 0
        self.scale = _lerp(0.88, 1.12, c(11))
        self.shift_u, self.shift_v = _lerp(-0.07, 0.07, c(12)), _lerp(-0.07, 0.07, c(13))
        self.yaw = _lerp(-0.3, 0.3, c(14))
        self.light_u, self.light_v = _lerp(-0.9, 0.9, c(15)), _lerp(-0.7, 0.3, c(16))
        self.ambient = _lerp(0.3, 0.7, c(17))
        cast = 1.0 + (p[:, 18:21] - 0.5) * 0.2
        self.cast = (cast / cast.mean(1, keepdims=True)).astype(np.float32)
        self.brightness, self.gamma = _lerp(0.65, 1.25, c(21)), _lerp(0.7, 1.4, c(22))
        self.ramp_angle, self.ramp = _lerp(0, 2 * np.pi, c(23)), _lerp(0.0, 0.45, c(24))
        # Muted colours: a grey level plus a little saturation.
        muted = lambda grey, rgb, sat: (grey + sat * (rgb - 0.5)).astype(np.float32)  # noqa: E731
        self.bg_a = muted(_lerp(0.15, 0.85, p[:, 25, None]), p[:, 26:29], 0.35)
        self.bg_b = muted(_lerp(0.15, 0.85, p[:, 29, None]), p[:, 26:29] * 0.5 + p[:, 30:33] * 0.5, 0.35)
        self.clothes = muted(_lerp(0.1, 0.8, p[:, 33, None]), p[:, 30:33], 0.6)
        self.background_noise = background_noise


def _window(size: int, lo: float, hi: float) -> slice:
    return slice(max(0, int(np.floor((lo + 1) / 2 * size))), min(size, int(np.ceil((hi + 1) / 2 * size))))


def _draw_expression(rgba: np.ndarray, ids: Identities, s: Samples, size: int) -> None:
    """Eyes, brows, glasses and mouth of each sample, painted in place on its identity base."""
    u_all, v_all, px = _canonical_grid(size)
    rows, cols = _window(size, -0.5, 0.08), _window(size, -0.48, 0.48)
    win = rgba[:, rows, cols]
    u, v = u_all[:, :, cols], v_all[:, rows, :]
    au, side = np.abs(u), np.sign(u)
    du, dv = au - ids.eye_u, v - ids.eye_v
    a, b = ids.eye_a, ids.eye_b * s.eye_open
    _paint(win, _ellipse(du, dv, a + px * 0.7, b + px * 0.9, px), ids.skin * 0.35)  # lashes
    white = _ellipse(du, dv, a, b, px)
    _paint(win, white, np.full((ids.n, 3), 0.92, np.float32))
    iris_u = du - s.gaze_u * a * 0.5 * side
    iris_v = dv - s.gaze_v * ids.eye_b * 0.5
    iris_r = ids.eye_b * 0.95
    _paint(win, white * _ellipse(iris_u, iris_v, iris_r, iris_r, px), ids.iris)
    _paint(win, white * _ellipse(iris_u, iris_v, iris_r * 0.45, iris_r * 0.45, px),
           np.full((ids.n, 3), 0.05, np.float32))
    # Brows: an arched band above each eye; frowning lowers the inner ends.
    bu = au - ids.eye_u
    brow_v = ids.eye_v - ids.brow_gap - s.brow_raise - ids.brow_arch * (1 - (bu / ids.brow_len) ** 2) \
        - (ids.brow_tilt - s.frown) * bu
    taper = 1.0 - 0.4 * np.clip(bu / ids.brow_len, 0, 1)
    brow = _soft(np.abs(v - brow_v) - ids.brow_thick * 0.5 * taper, px) * _soft(np.abs(bu) - ids.brow_len, px)
    _paint(win, brow, ids.hair * 0.8)
    frame_a, frame_b = ids.eye_a * 1.55, ids.eye_b * 0.5 + 0.075
    q = np.sqrt((du / frame_a) ** 2 + ((dv - 0.01) / frame_b) ** 2)
    frame = _soft(np.abs(q - 1.0) * frame_b - 0.008, px)
    bridge = _soft(np.abs(v - ids.eye_v + 0.02) - 0.008, px) * _soft(au - (ids.eye_u - frame_a), px)
    _paint(win, ids.glasses * np.maximum(frame, bridge), np.full((ids.n, 3), 0.08, np.float32))

    rows, cols = _window(size, 0.15, 0.75), _window(size, -0.3, 0.3)
    win = rgba[:, rows, cols]
    u, v = u_all[:, :, cols], v_all[:, rows, :]
    t = u / ids.mouth_w
    envelope = np.sqrt(np.clip(1.0 - t ** 2, 0, 1))
    dv = v - ids.mouth_v + s.smile * 0.05 * t ** 2 - s.smile * 0.01
    opening = s.mouth_open * 0.04 * envelope
    lt = ids.lip_thick * envelope
    lips = _soft(np.abs(dv - 0.1 * lt) - (opening + 1.1 * lt), px) * _soft(np.abs(t) - 1.0, px / ids.mouth_w)
    _paint(win, lips, ids.lip)
    inside = _soft(np.abs(dv) - opening, px) * _soft(np.abs(t) - 0.97, px / ids.mouth_w) * (s.mouth_open > 0)
    _paint(win, inside, np.full((ids.n, 3), 0.12, np.float32) * np.array([1.3, 0.7, 0.7], np.float32))
    teeth = inside * _soft(dv + opening * 0.35, px) * _soft(np.abs(t) - 0.6, px / ids.mouth_w)
    _paint(win, teeth, np.full((ids.n, 3), 0.85, np.float32))
    line = _soft(np.abs(dv) - 0.005, px) * _soft(np.abs(t) - 1.0, px / ids.mouth_w) * (s.mouth_open == 0)
    _shade(win, line, 0.45)


def _warp(rgba: np.ndarray, s: Samples, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples the canonical rgba [n, S, S, 4] at each image pixel through the sample's pose.

    Returns the warped rgba [n, size, size, 4] and the canonical coordinates (u, v) [n, size, size]
    of every image pixel (the lighting needs them).
    """
    n, src = len(rgba), rgba.shape[1]
    t = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1)
    x, y = t[None, None, :] - s.shift_u, t[None, :, None] - s.shift_v
    cos, sin = np.cos(s.roll), np.sin(s.roll)
    zoom = s.scale * _ZOOM
    u = (cos * x + sin * y) / zoom
    v = (-sin * x + cos * y) / zoom
    # Yaw: a point at depth z on the head ellipsoid (and the nose, which sticks out) moves
    # sideways by yaw * z; inverting that displacement to first order.
    depth = np.sqrt(np.clip(1.0 - (u / 0.75) ** 2 - (v / 0.95) ** 2, 0, 1))
    depth += 0.6 * np.exp(-(u / 0.09) ** 2 - ((v - 0.08) / 0.16) ** 2)
    u = u - s.yaw * 0.35 * depth
    padded = np.pad(rgba, ((0, 0), (1, 1), (1, 1), (0, 0)))  # transparent outside the frame
    fx = np.clip((u + 1) * 0.5 * src + 0.5, 0, src + 0.999)  # +0.5: pixel centres, +1: padding
    fy = np.clip((v + 1) * 0.5 * src + 0.5, 0, src + 0.999)
    x0, y0 = fx.astype(np.int32), fy.astype(np.int32)
    wx, wy = (fx - x0)[..., None], (fy - y0)[..., None]
    flat = padded.reshape(-1, 4)
    row = src + 2
    base = (np.arange(n, dtype=np.intp) * row ** 2)[:, None, None] + y0 * row + x0
    corner = lambda offset: np.take(flat, base + offset, axis=0)  # noqa: E731  (take: 8x faster than [])
    top = corner(0)
    top += (corner(1) - top) * wx
    bottom = corner(row)
    bottom += (corner(row + 1) - bottom) * wx
    top += (bottom - top) * wy
    return top, u, v


def render(ids: Identities, bases: np.ndarray, s: Samples, size: int) -> np.ndarray:
    """Images uint8 [n, size, size, 3] for samples of identities `ids` (one per sample) whose
    identity bases (`render_identities`, already indexed per sample) are `bases`."""
    canvas_size = bases.shape[1]
    rgba = bases.copy()
    _draw_expression(rgba, ids, s, canvas_size)
    fg, u, v = _warp(rgba, s, size)
    # Lambert shading on the head ellipsoid; the light sits in front, off to one side.
    nu, nv = u / 0.75, v / 0.95
    nz = np.sqrt(np.clip(1.0 - nu ** 2 - nv ** 2, 0.05, 1))
    lu, lv = s.light_u, s.light_v
    lz = np.sqrt(np.clip(1.0 - lu ** 2 - lv ** 2, 0.1, 1))
    lambert = np.clip(nu * lu + nv * lv + nz * lz, 0, 1)
    fg[..., :3] *= (s.ambient + (1.0 - s.ambient) * 1.25 * lambert)[..., None]
    # Background: two colours along a random direction, blobs, then the torso.
    t = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1)
    x, y = t[None, None, :], t[None, :, None]
    along = np.clip(0.5 + 0.5 * (x * np.cos(s.ramp_angle * 3) + y * np.sin(s.ramp_angle * 3)), 0, 1)
    bg = s.bg_a[:, None, None, :] + (s.bg_b - s.bg_a)[:, None, None, :] * along[..., None]
    bg = bg * (1.0 + 0.3 * _field(s.background_noise, size))[..., None]
    torso = _ellipse(x - s.shift_u * 0.5, y - 1.75, 1.2, 0.8, 2.0 / size)[..., None]
    bg += torso * (s.clothes[:, None, None, :] - bg)
    image = fg[..., :3] + (1.0 - fg[..., 3:]) * bg
    # Illumination over the whole picture: brightness ramp, colour cast, exposure, gamma.
    ramp = 1.0 + s.ramp * (x * np.cos(s.ramp_angle) + y * np.sin(s.ramp_angle))
    image *= (ramp * s.brightness)[..., None] * s.cast[:, None, None, :]
    # Gamma through a per-sample table on 1024 levels (a power over every pixel is slow).
    levels = np.linspace(0, 1, 1024, dtype=np.float32)
    table = (levels[None, :] ** s.gamma[:, 0] * 255 + 0.5).astype(np.uint8)
    index = (np.clip(image, 0, 1) * 1023 + 0.5).astype(np.intp)
    index += (np.arange(len(image), dtype=np.intp) * 1024)[:, None, None, None]
    return np.take(table.reshape(-1), index)
