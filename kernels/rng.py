"""Counter-based random numbers for the kernels: Philox4x32-10 (Salmon et al., 2011), as in
``tl.philox``, with every one of its four 32-bit outputs used.

A draw is keyed by the seed and addressed by a 4-word counter (c0, c1, c2, c3); the kernels use
c0 = position within a row, c1 = row, c2 = stream (which kernel family draws), c3 = 0, so a value
depends only on (seed, row, position, stream): never on block sizes, warps or launch order, and the
backward pass regenerates exactly the forward's noise.
"""

from __future__ import annotations

from .dispatch import constexpr, jit, tl

# c2 of the Philox counter: the straight-through kernels and the ids-only sampler draw disjoint streams.
STREAM_GUMBEL = constexpr(0)
STREAM_IDS = constexpr(1)


@jit
def philox4(seed, c0, row, STREAM: tl.constexpr):
    """Four independent uint32 blocks shaped like c0, from one Philox call per counter."""
    # Adding a 0-d tensor makes a tensor of c0 whether it is a tensor or a constexpr loop index
    # (tl.to_tensor does the same but only exists from Triton 3.7).
    c0 = (c0 + tl.zeros((), dtype=tl.int32)).to(tl.uint32)
    c1 = (c0 * 0 + row).to(tl.uint32)
    c2 = c0 * 0 + STREAM
    return tl.philox(seed, c0, c1, c2, c0 * 0)


@jit
def open_uniform(bits):
    """uint32 -> fp32 uniform on the open interval (0, 1): the top 23 bits k as (k + 0.5) * 2**-23,
    exact in fp32, so never 0 or 1 and no clamping is needed."""
    return ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)


@jit
def unit_uniform(bits):
    """uint32 -> fp32 uniform on [0, 1): the top 24 bits times 2**-24 (exact)."""
    return (bits >> 8).to(tl.float32) * (1.0 / 16777216.0)


@jit
def fast_log2(x, FAST_MATH: tl.constexpr):
    """log2 with one MUFU.LG2 on GPU (lg2.approx: absolute error ~2**-22 near 1, relative elsewhere).
    The interpreter cannot run PTX, so it gets the exact log2."""
    if FAST_MATH:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.log2(x)


@jit
def exponential(u, FAST_MATH: tl.constexpr):
    """E = -ln(u) ~ Exp(1) for a uniform u in (0, 1), accurate relative to E itself.

    Relative accuracy matters: the maximum of V Gumbels G = -ln(E) sits near ln V (~11 for a
    vocabulary), where E ~ 1e-5, i.e. u is within 1e-5 of 1, and lg2.approx is only absolutely
    accurate there (2**-22.6 near 1). So for u > 15/16 E comes from the series
    -ln(1 - d) = d + d^2/2 + ... + d^7/7 in d = 1 - u (exact in fp32; truncation < 5e-10 relative),
    and below that from -log2(u) * ln 2, where |log2 u| > 0.093 keeps the relative error < 2e-6.
    """
    d = 1.0 - u
    series = d * (1.0 + d * (0.5 + d * (1.0 / 3.0 + d * (0.25 + d * (0.2 + d * (1.0 / 6.0 + d * (1.0 / 7.0)))))))
    return tl.where(d < 0.0625, series, -fast_log2(u, FAST_MATH) * 0.6931471805599453)


@jit
def gumbel_log2e(u, FAST_MATH: tl.constexpr):
    """A standard Gumbel sample times log2(e), from a uniform u in (0, 1): G * log2(e) = -log2(E),
    E = -ln(u) ~ Exp(1). The outer log only needs absolute accuracy (errors of ~1e-6 on G), so it
    is lg2.approx."""
    return -fast_log2(exponential(u, FAST_MATH), FAST_MATH)
