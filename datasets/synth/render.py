"""Render cells into Cell Painting-like fluorescence images (float32, before the microscope).

Vectorised over images and cells: every cell is an irregular ellipse (radial harmonics 2 and 3)
with an off-centre nucleus, evaluated on the whole pixel grid at once, so a chunk of images costs a
few array passes. Channels follow the preset's stains (`stains.STAINS`: nucleus, cytoplasm, perinuclear
pile-up, membrane ring, texture), e.g. for Cell Painting:
    DNA  (Hoechst)            nucleus, fine chromatin granularity
    ER   (concanavalin A)     cytoplasm, concentrated around the nucleus, reticular texture
    RNA  (SYTO 14)            nucleoli-like nuclear spots plus diffuse cytoplasm
    AGP  (phalloidin + WGA)   plasma-membrane ring plus oriented actin fibres
    Mito (MitoTracker)        punctate cytoplasm, concentrated around the nucleus
Geometry is in units of the image side, so the same preset renders the same biology at any size.
"""

from __future__ import annotations

import numpy as np

from . import stains
from .biology import FeatureSpace

CELL_RADIUS = 0.16  # fraction of the image side, at magnification 1
NUCLEUS_RATIO = 0.45
ASPECT = 0.25  # log axis ratio of an unperturbed cell
IRREGULARITY = 0.10
_CHUNK_ELEMENTS = 1_000_000  # cell-patch pixels evaluated per pass (bounds memory, stays cache-friendly)


def render(feats: np.ndarray, active: np.ndarray, size: int, magnification: np.ndarray, space: FeatureSpace,
           rng: np.random.Generator) -> np.ndarray:
    """Fluorescence images [N, C, size, size] of `space.channels` from cell features [N, M, F] and the active
    mask [N, M].

    `magnification` [N] scales cells and textures in pixels (a microscope property: sources differ).
    Each active cell is evaluated on its own square patch (large enough for the plate's biggest cell)
    and added into its image, so the cost grows with the cells' area, not with cells x image area.
    """
    n = feats.shape[0]
    out = np.zeros((n, len(space.channels), size, size), dtype=np.float32)
    g = _geometry(feats, active, magnification, space, rng)
    image_of, slot = np.nonzero(active)
    g = {k: v[image_of, slot] for k, v in g.items()}
    weights = _weights(feats[image_of, slot], space).astype(np.float32)  # [K, 4, C]
    perinuclear = feats[image_of, slot, space.index["perinuclear"]]
    # Patch side: the largest cell's bounding radius (irregular ellipse) plus the soft edge.
    reach = g["radius"] * np.sqrt(g["aspect"]) * (1 + g["a2"] + g["a3"]) * size + 2
    half = int(np.ceil(reach.max()))
    patch = 2 * half
    # Patch origin: the cell's pixel minus half; pixel centres of the patch in image units.
    x0 = np.floor(g["cx"] * size).astype(int) - half
    y0 = np.floor(g["cy"] * size).astype(int) - half
    step = max(1, _CHUNK_ELEMENTS // (patch * patch))
    for start in range(0, len(image_of), step):
        sl = slice(start, start + step)
        contrib = _cells({k: v[sl] for k, v in g.items()}, x0[sl], y0[sl], perinuclear[sl], weights[sl], patch,
                         size)
        for k, (img, xs, ys) in enumerate(zip(image_of[sl], x0[sl], y0[sl])):
            # clip the patch to the image (cells may straddle the border, as in a real field of view)
            a, b = max(0, -ys), min(patch, size - ys)
            c, d = max(0, -xs), min(patch, size - xs)
            out[img, :, ys + a: ys + b, xs + c: xs + d] += contrib[k, :, a:b, c:d]
    out *= _textures(feats[:, 0, :], magnification, size, space, rng)
    return out


def _geometry(feats, active, magnification, space: FeatureSpace, rng) -> dict[str, np.ndarray]:
    n, m, _ = feats.shape
    f = lambda name: feats[:, :, space.index[name]]  # noqa: E731
    radius = CELL_RADIUS * np.exp(f("cell_size")) * magnification[:, None]
    aspect = np.exp(ASPECT + f("elongation"))
    irr = np.clip(IRREGULARITY + f("irregularity"), 0.0, 0.35)
    split = rng.uniform(0.2, 0.8, (n, m))
    ratio = NUCLEUS_RATIO * np.exp(f("nucleus_ratio"))
    theta = rng.uniform(0, np.pi, (n, m))
    offset = rng.uniform(0, 0.35, (n, m)) * (1 - ratio) * radius
    off_angle = rng.uniform(0, 2 * np.pi, (n, m))
    p2, p3 = rng.uniform(0, 2 * np.pi, (n, m)), rng.uniform(0, 2 * np.pi, (n, m))
    return dict(
        cx=rng.uniform(0, 1, (n, m)), cy=rng.uniform(0, 1, (n, m)), radius=radius, aspect=aspect,
        cos=np.cos(theta), sin=np.sin(theta), a2=irr * split, a3=irr * (1 - split),
        w2r=irr * split * np.cos(p2), w2i=irr * split * np.sin(p2),
        w3r=irr * (1 - split) * np.cos(p3), w3i=irr * (1 - split) * np.sin(p3), ratio=ratio,
        nox=offset * np.cos(off_angle), noy=offset * np.sin(off_angle),
    )


def _cells(g: dict[str, np.ndarray], x0: np.ndarray, y0: np.ndarray, perinuclear: np.ndarray,
           weights: np.ndarray, patch: int, size: int) -> np.ndarray:
    """Channel contributions [K, C, P, P] of K cells on their patches (one batched matmul at the end)."""
    k = len(x0)
    col = lambda a: np.asarray(a, dtype=np.float32)[:, None, None]  # noqa: E731
    offs = np.arange(patch, dtype=np.float32)
    # pixel-centre coordinates relative to the cell centre, in image units: [K, 1, P] and [K, P, 1]
    dx = ((x0[:, None] + offs[None, :] + 0.5) / size - g["cx"][:, None]).astype(np.float32)[:, None, :]
    dy = ((y0[:, None] + offs[None, :] + 0.5) / size - g["cy"][:, None]).astype(np.float32)[:, :, None]
    half = np.sqrt(g["aspect"])
    a, b = g["radius"] * half, g["radius"] / half
    cos, sin = col(g["cos"]), col(g["sin"])
    # rotated, axis-normalised coordinates: cheap separable terms, one full-size add each
    ua = dx * (cos / col(a)) + dy * (sin / col(a))
    vb = dy * (cos / col(b)) - dx * (sin / col(b))
    ua2, vb2 = ua * ua, vb * vb
    q = ua2 + vb2 + np.float32(1e-9)
    r = np.sqrt(q)
    # radial harmonics 2 and 3: Re(w2 z^2) / |z|^2 + Re(w3 z^3) / |z|^3 with z = ua + i vb
    t2 = col(g["w2r"]) * (ua2 - vb2) - col(g["w2i"]) * (2 * ua * vb)
    t3 = col(g["w3r"]) * ua * (ua2 - 3 * vb2) - col(g["w3i"]) * vb * (3 * ua2 - vb2)
    wobble = (t2 + t3 / r) / q
    del ua2, vb2, t2, t3
    # Soft edges about one pixel wide, whatever the image size.
    soft = col(1.0 / (g["radius"] * size))
    cell = _smoothstep((1 - r / (1 + wobble)) / soft)
    ratio = col(g["ratio"])
    # nucleus: same orientation, off-centre, half the wobble
    nx = (g["nox"] * g["cos"] + g["noy"] * g["sin"]) / a
    ny = (g["noy"] * g["cos"] - g["nox"] * g["sin"]) / b
    nu, nv = (ua - col(nx)) / ratio, (vb - col(ny)) / ratio
    dn = np.sqrt(nu * nu + nv * nv) / (1 + 0.4 * wobble)
    del ua, vb, q, r, nu, nv, wobble
    nuc = _smoothstep((1 - dn) / (soft / ratio)) * cell
    cyto = cell - nuc
    kpn = np.float32(1.5) * np.exp(col(perinuclear))
    peri = cyto * np.exp(-kpn * np.maximum(dn - 1, 0) * ratio)
    ring = 4 * cell * (1 - cell)
    fields = np.stack([nuc, cyto, peri, ring], axis=1).reshape(k, 4, patch * patch)
    return np.matmul(weights.transpose(0, 2, 1), fields).reshape(k, weights.shape[-1], patch, patch)


def _weights(feats: np.ndarray, space: FeatureSpace) -> np.ndarray:
    """Per-cell channel intensity of each compartment field: [K, 4 (nuc, cyto, peri, ring), C]."""
    ch = space.channels
    perinuclear = stains.values(ch, "perinuclear")
    i_nuc = stains.values(ch, "nucleus") * np.exp(feats[..., space.block("int_nuc")])
    i_cyto = stains.values(ch, "cytoplasm") * np.exp(feats[..., space.block("int_cyto")])
    ring = stains.values(ch, "membrane") * np.exp(feats[..., space.index["membrane"]])[..., None]
    return np.stack([i_nuc, i_cyto * (1 - perinuclear), i_cyto * perinuclear * 1.6, ring], axis=-2)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    t = np.clip(0.5 + 0.5 * x, 0, 1)
    return t * t * (3 - 2 * t)


def _textures(image_feats: np.ndarray, magnification: np.ndarray, size: int, space: FeatureSpace, rng
              ) -> np.ndarray:
    """Log-normal organelle texture per image and channel: band-pass noise (oriented for actin fibres).

    The noise is drawn directly in the Fourier domain (complex Gaussian), so one inverse FFT suffices.
    """
    n, ch = image_feats.shape[0], space.channels
    amp = (stains.values(ch, "tex_amp") * np.exp(image_feats[:, space.block("tex_amp")])).astype(np.float32)
    # cycles per pixel: cycles per cell radius / cell radius in pixels; capped below Nyquist
    freq = stains.values(ch, "tex_freq") * np.exp(image_feats[:, space.block("tex_freq")]) / (
        CELL_RADIUS * magnification[:, None] * size)
    freq = np.minimum(freq, 0.42).astype(np.float32)
    fy = np.fft.fftfreq(size).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(size).astype(np.float32)[None, :]
    log_fr = np.log(np.maximum(np.sqrt(fx * fx + fy * fy), np.float32(1e-6)))
    # log-normal ring around each image's frequency (bandwidth 0.35 in log frequency)
    band = np.exp((log_fr - np.log(freq)[:, :, None, None]) ** 2 * np.float32(-1 / (2 * 0.35 ** 2)))
    # orientation selectivity (fibres) only where a channel asks for it
    angle = np.arctan2(fy, fx)
    theta = rng.uniform(0, np.pi, n).astype(np.float32)
    c2t, s2t = np.cos(2 * theta)[:, None, None], np.sin(2 * theta)[:, None, None]
    aniso = stains.values(ch, "tex_aniso")
    for c in np.flatnonzero(aniso):
        cos2 = np.cos(2 * angle)[None] * c2t + np.sin(2 * angle)[None] * s2t  # cos(2 (angle - theta))
        band[:, c] *= np.exp(np.float32(aniso[c]) * (cos2 - 1))
    band[:, :, 0, 0] = 0.0
    shape = band.shape
    spectrum = band * rng.standard_normal(shape, dtype=np.float32) + 1j * (band * rng.standard_normal(
        shape, dtype=np.float32))
    tex = np.fft.irfft2(spectrum.astype(np.complex64), s=(size, size)).astype(np.float32)
    tex /= np.sqrt(np.mean(tex * tex, axis=(2, 3), keepdims=True)) + np.float32(1e-6)
    a = amp[:, :, None, None]
    return np.exp(a * tex - a * a / 2)
