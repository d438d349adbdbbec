"""How much of a slice is stripes: the energy on the stripe ridge of its spectrum, relative to an isotropic one.

Curtains are long and constant along their direction, so their spectrum lies on a line through the origin
perpendicular to them (the ridge: for vertical curtains, the row of zero vertical frequency). Content has
energy there too, about as much as at any other frequency of the same radius. The meter divides each ridge
coefficient's power by the mean power of the slice's off-ridge coefficients at the same radius (a radial profile
of the spectrum) and averages these ratios along the ridge, weighted by the noise filter's spectral envelope
across the stripes. A slice without stripes gives about 1 (real structure aligned with the ridge a little more);
curtains give many times that.

The FFT sees the jump between opposite borders as a line along the border, which would look exactly like a
stripe; so does a flat band around the image or a background ramp. The meter removes each slice's plane and
measures it under a Hann window, which leaves a stripe's power within a bin of its ridge.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gpustack.kernels.fft_sizes import fast_size_below
from gpustack.kernels.vsnr import NoiseFilter

if TYPE_CHECKING:
    import torch

RIDGE_HALF_WIDTH = 1.0  # frequency bins either side of the ridge line (the Hann window's main lobe)
MAX_SIDE = 1024  # px: the meter looks at a central window of at most this side
MIN_RING = 4  # off-ridge coefficients a radius needs for its mean power to be a reference
FLOOR = 1e-7  # of the slice's mean spectral power (its mean squared dominates): far below any detector noise
RIDGE_MIN = 3.0  # bins from the origin: below this the ridge holds the slice's mean and background, not stripes


def dominant_filter(filters: list[NoiseFilter]) -> NoiseFilter | None:
    """The most elongated Gabor filter (its orientation is the stripes'); None if no filter has one."""
    oriented = [f for f in filters if f.oriented]
    return max(oriented, key=lambda f: max(f.sigma) / min(f.sigma)) if oriented else None


def _windowed_spectrum(u: torch.Tensor) -> torch.Tensor:
    """rfft2 of each slice (B, H, W) minus its best-fit plane, under a Hann window: the slice's borders (and a
    flat band around it, or a background ramp) would otherwise show as lines along the axes, exactly like
    stripes. The window spreads a stripe over its ridge's neighbouring bins only (RIDGE_HALF_WIDTH)."""
    import torch

    h, w = u.shape[-2:]
    y = torch.arange(h, device=u.device, dtype=torch.float32) - (h - 1) / 2
    x = torch.arange(w, device=u.device, dtype=torch.float32) - (w - 1) / 2
    # On a full grid the constant, x and y are orthogonal: the plane's coefficients are three reductions.
    mean = u.mean(dim=(1, 2), keepdim=True)
    slope_x = (u.mean(dim=1) * x).sum(dim=1) / x.square().sum()
    slope_y = (u.mean(dim=2) * y).sum(dim=1) / y.square().sum()
    flat = u - mean - slope_x[:, None, None] * x[None, None, :] - slope_y[:, None, None] * y[None, :, None]
    window = torch.hann_window(h, periodic=True, device=u.device)[:, None] * \
        torch.hann_window(w, periodic=True, device=u.device)[None, :]
    return torch.fft.rfft2(flat * window)


class StripeMeter:
    """Ridge-to-isotropic power ratio per slice, for slices of one shape and the stripes of one filter."""

    def __init__(self, shape: tuple[int, int], stripes: NoiseFilter, device: torch.device):
        import torch

        # A central window at most MAX_SIDE wide: curtains run across the slice, so it holds them too, and the
        # meter's cost stays small beside the correction's. Its sides are fast FFT sizes (451 -> 450: the FFT
        # 7x faster for one row and column less).
        h, w = fast_size_below(min(shape[0], MAX_SIDE)), fast_size_below(min(shape[1], MAX_SIDE))
        self.window = (slice((shape[0] - h) // 2, (shape[0] - h) // 2 + h),
                       slice((shape[1] - w) // 2, (shape[1] - w) // 2 + w))
        fy = torch.fft.fftfreq(h, device=device, dtype=torch.float64)[:, None]
        fx = torch.fft.rfftfreq(w, device=device, dtype=torch.float64)[None, :]
        th = math.radians(stripes.theta)
        # Stripes vary across (x cos + y sin) and are constant along; their spectrum lies where the frequency's
        # component along them vanishes. Bins are measured with the image's extent in each direction.
        along = (-fx * math.sin(th) + fy * math.cos(th)).abs() * (h * math.cos(th) ** 2 + w * math.sin(th) ** 2)
        across = (fx * math.cos(th) + fy * math.sin(th)).abs()
        across_bins = across * (w * math.cos(th) ** 2 + h * math.sin(th) ** 2)
        ridge = (along <= RIDGE_HALF_WIDTH) & (across_bins >= RIDGE_MIN)
        envelope = torch.exp(-2 * math.pi ** 2 * (stripes.sigma[0] * across) ** 2)
        radius = torch.round(torch.sqrt(fx ** 2 + fy ** 2) * max(h, w)).to(torch.int64)
        off = ~ridge & (along > 2 * RIDGE_HALF_WIDTH)
        self.n_radii = int(radius.max()) + 1
        self.radius_off = radius[off]
        self.off = off.flatten().nonzero().squeeze(1)
        counts = torch.zeros(self.n_radii, dtype=torch.float32, device=device)
        counts.index_add_(0, self.radius_off, torch.ones_like(self.radius_off, dtype=torch.float32))
        self.counts = counts.clamp_min(1.0)
        # Ridge coefficients whose radius has too few others to average over (the first rings) are not used.
        ridge &= counts[radius] >= MIN_RING
        self.ridge = ridge.flatten().nonzero().squeeze(1)
        if self.ridge.numel() == 0:
            raise ValueError(f"slices of {w}x{h} are too small to measure stripes")
        self.radius_ridge = radius.flatten()[self.ridge]
        weight = envelope.flatten()[self.ridge]
        self.weight = (weight / weight.sum()).to(torch.float32)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """(B,) ratios for slices (B, H, W); 1 for a constant slice."""
        import torch

        power = _windowed_spectrum(u[:, self.window[0], self.window[1]].to(torch.float32)).abs().square().flatten(1)
        radial = torch.zeros((power.shape[0], self.n_radii), dtype=torch.float32, device=u.device)
        radial.index_add_(1, self.radius_off, power[:, self.off])
        radial /= self.counts
        # A floor far below any real content: where a slice has no power at all (an ideal smooth image's high
        # frequencies, a constant slice) ridge and surroundings are equal, not infinitely different.
        floor = power.mean(dim=1, keepdim=True) * FLOOR + torch.finfo(torch.float32).tiny
        ratio = (power[:, self.ridge] + floor) / (radial[:, self.radius_ridge] + floor)
        return (ratio * self.weight).sum(dim=1)


def gate(ratio: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """How much of its correction each slice gets: 0 up to a ratio of `lo`, 1 from `hi`, linear in log between;
    a slice whose ratio could not be measured gets the full correction."""
    import torch

    g = (torch.log(ratio) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return torch.nan_to_num(g, nan=1.0).clamp(0.0, 1.0)
