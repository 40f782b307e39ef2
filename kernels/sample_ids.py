"""Ids-only sampling for student steps: ids ~ Categorical(softmax(logits)) per row, and nothing else.

The hard Gumbel-softmax sample's law is Categorical(softmax(x)) for any tau, and a student step
keeps only the ids, so there is no need for V noise values per row, for the relaxed sample or for
an [M, V] one-hot. The Triton kernel reads each row once and writes one id:

  * per block of the row (BLOCK columns): its max b, its mass B = sum exp(x - b), and one Philox
    call (counter (block, row, 1, 0)) giving two uniforms;
  * the blocks race with the Gumbel-max trick on their log-masses: key = b + ln B + G. The block
    with the largest key is chosen with probability mass / total mass;
  * after the pass, an id inside the winning block is drawn by inverse CDF with that block's second
    uniform: the first column whose running sum of exp(x - b) exceeds u * B (the block is read
    again: BLOCK more elements per row, and the scan runs once per row, outside the loop).
  P(id) = P(its block) * P(id | block) = (B_blk / total) * (exp(x_id - b) / B_blk) = softmax(x)[id].

The torch backend returns exactly the ids of ``gumbel_softmax_sample(..., backend="torch")`` for the
same seed (Gumbel-max on the same noise), drawing that noise one row chunk at a time, so it never
holds an [M, V] tensor either.
"""

from __future__ import annotations

import torch

from .dispatch import constexpr, is_interpreted, jit, resolve_backend, tl
from .gumbel import _draw_seed, _normalize_seed, _torch_gumbel_noise_chunks, check_logits
from .launch import as_rows, launch, launch_config, loadable_cols
from .rng import STREAM_IDS, fast_log2, gumbel_log2e, open_uniform, philox4, unit_uniform

_LOG2E = constexpr(1.4426950408889634)
_NO_COLUMN = constexpr(2147483647)


# --------------------------------------------------------------------------- Triton kernel


@jit
def _block_of_row(x_row, start, V, LOAD_N, PADDED: tl.constexpr, BLOCK: tl.constexpr):
    """Columns and fp32 logits of the block at ``start`` (-inf outside the row)."""
    cols = start + tl.arange(0, BLOCK)
    x = tl.load(x_row + cols, mask=cols < LOAD_N, other=float("-inf")).to(tl.float32)
    if PADDED:
        x = tl.where(cols < V, x, float("-inf"))
    return cols, x


@jit
def _block_exp2(x):
    """(ref, e): ref = the block's max in base 2 (0 for an all -inf block, whose mass is then 0 and
    key -inf) and e = exp2(x * log2(e) - ref), one FFMA and one MUFU.EX2 per element."""
    blk_max = tl.max(x, 0) * _LOG2E
    ref = tl.where(blk_max == float("-inf"), 0.0, blk_max)
    return ref, tl.exp2(x * _LOG2E - ref)


@jit
def _pick_in_block(e, cols, target):
    """First column whose running sum of e exceeds target; if rounding leaves none (target at the
    very top of the block's mass), the last column with e > 0."""
    running = tl.cumsum(e, 0)
    hit = tl.min(tl.where(running > target, cols, _NO_COLUMN), 0)
    last_live = tl.max(tl.where(e > 0.0, cols, -1), 0)
    return tl.where(hit == _NO_COLUMN, last_live, hit)


@jit
def _block_uniforms(seed, block, row, UNIFORMS, n_blocks, HAS_UNIFORMS: tl.constexpr):
    """The block's two uniforms: u_race in (0, 1) for its Gumbel, u_pick in [0, 1) for the
    inverse CDF; from Philox, or (test hook) read from UNIFORMS [M, n_blocks, 2]."""
    if HAS_UNIFORMS:
        at = UNIFORMS + (row * n_blocks + block) * 2
        u_race = tl.load(at)
        u_pick = tl.load(at + 1)
    else:
        race_bits, pick_bits, _, _ = philox4(seed, block, row, STREAM_IDS)
        u_race = open_uniform(race_bits)
        u_pick = unit_uniform(pick_bits)
    return u_race, u_pick


@jit(do_not_specialize=["seed"])
def _sample_ids_kernel(
    X, stride_x, IDS, UNIFORMS, seed, V, LOAD_N,
    HAS_UNIFORMS: tl.constexpr, PADDED: tl.constexpr, FAST_MATH: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    n_blocks = tl.cdiv(V, BLOCK)
    # Pass over the row: the Gumbel-max race of the blocks' log-masses (scalars only).
    best_key = float("-inf")
    best_start = tl.zeros((), dtype=tl.int32)
    best_u = 0.0
    for start in range(0, V, BLOCK):
        cols, x = _block_of_row(x_row, start, V, LOAD_N, PADDED, BLOCK)
        ref, e = _block_exp2(x)
        mass = tl.sum(e, 0)
        u_race, u_pick = _block_uniforms(seed, start // BLOCK, row, UNIFORMS, n_blocks, HAS_UNIFORMS)
        # key * ln 2 = ln(block mass) + G. mass >= 1 unless the block is all -inf: then key = -inf.
        log_mass = tl.where(mass > 0.0, fast_log2(tl.maximum(mass, 1.0), FAST_MATH), float("-inf"))
        key = ref + log_mass + gumbel_log2e(u_race, FAST_MATH)
        better = key > best_key
        best_key = tl.where(better, key, best_key)
        best_start = tl.where(better, start, best_start)
        best_u = tl.where(better, u_pick, best_u)
    # Inverse CDF inside the winning block only: one more block read per row, and the scan (the
    # costly part) runs once per row instead of in every iteration.
    cols, x = _block_of_row(x_row, best_start, V, LOAD_N, PADDED, BLOCK)
    _, e = _block_exp2(x)
    best = _pick_in_block(e, cols, best_u * tl.sum(e, 0))
    tl.store(IDS + row, tl.maximum(best, 0).to(tl.int64))


# --------------------------------------------------------------------------- host side


def _sample_ids_triton(logits: torch.Tensor, seed: int, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Triton path; ``uniforms`` [M, cdiv(V, BLOCK), 2] fp32 (race, pick) replaces Philox (tests)."""
    x = as_rows(logits)
    n_rows, n_cols = x.shape
    ids = torch.empty(n_rows, dtype=torch.int64, device=x.device)
    if n_rows:
        load_n = loadable_cols(x)
        uniforms_arg = ids if uniforms is None else uniforms.contiguous()  # dummy pointer without the hook
        launch(
            _sample_ids_kernel, (n_rows,),
            x, x.stride(0), ids, uniforms_arg, seed, n_cols, load_n,
            HAS_UNIFORMS=uniforms is not None, PADDED=load_n > n_cols,
            FAST_MATH=not is_interpreted(_sample_ids_kernel), **launch_config(n_cols),
        )
    return ids.view(logits.shape[:-1])


# --------------------------------------------------------------------------- torch backend


def _sample_ids_torch(logits: torch.Tensor, seed: int) -> torch.Tensor:
    """argmax(log_softmax(x) + G) with the torch backend's noise, one row chunk at a time."""
    x = logits.reshape(-1, logits.shape[-1])
    ids = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for first, noise in _torch_gumbel_noise_chunks(x.shape[0], x.shape[1], seed, x.device):
        rows = slice(first, first + noise.shape[0])
        # The same expression as the reference's z, so the argmax (ties included) is the same.
        ids[rows] = (torch.log_softmax(x[rows].float(), dim=-1) + noise).argmax(dim=-1)
    return ids.view(logits.shape[:-1])


# --------------------------------------------------------------------------- public API


def gumbel_sample_ids(logits, tau=1.0, seed=None, backend="auto"):
    """ids ~ Categorical(softmax(logits)) per row: the law of the hard sample of
    ``gumbel_softmax_sample`` (for any tau), without the relaxed sample or an [M, V] one-hot.

    Args:
        logits: [M, V] (or [..., V]) floating tensor; rows may have a padded row stride.
        tau: accepted for symmetry with gumbel_softmax_sample; the law does not depend on it.
        seed: RNG seed (reduced to [0, 2**31)); None draws one from torch's default generator.
        backend: "auto" | "triton" | "torch". The torch backend returns exactly
            ``gumbel_softmax_sample(logits, tau, seed=seed, backend="torch")[0]``; the Triton one
            draws the same law from its own stream (one Philox call per row block).

    Returns:
        ids: int64 [M] (logits' leading shape). Nothing of size M x V is allocated.
    """
    check_logits(logits, tau)
    seed = _draw_seed() if seed is None else _normalize_seed(seed)
    if resolve_backend(backend, logits) == "triton":
        return _sample_ids_triton(logits, seed)
    return _sample_ids_torch(logits, seed)
