"""Decode attention over packed blocks on a GPU, in Triton: split-K over sub-tiles of the blocks, one merge.

`_block_kernel` runs a grid of (programs, batch row x KV head). A group's blocks are cut into sub-tiles
of ``BLOCK_T`` tokens (`TILE_ELEMENTS` with the head; the last of a block may be short) and each program
takes an equal run of a row's sub-tiles, part of a block or several, so that a short history still fills
the GPU and a long one writes few partials. Per sub-tile it reads the normal-precision key and value
codes a 32-bit word (or the bytes of a window) per group of codes, unpacks and dequantizes them in
registers (uniform codes or a level table, key ranges per token group, symmetric or zero-point), turns
the keys by their place in the sub-tile and the queries by the sub-tile's first position (`BlockRope`'s
angle addition, split between the two sides), scores the grouped queries on tensor cores (`_dot`, fp32
accurate), adds the high-precision key channels' share from a compact tile of their own, and folds the
sub-tile into the program's running max, sum and output (online softmax). Live tiles are
``[head_dim / 2, BLOCK_T]`` keys and ``[BLOCK_T, head_dim]`` values.

`_merge_kernel` folds every program's partial, then the exact segments (sink copies, the tail; fp32 or
16-bit keys and values), into one row per query head: the attention output in the query's dtype, or an
``(acc, max, sum)`` partial for an `OnlineSoftmax`. A decode step is one launch per block group and one
merge (two merges and a rotation when values are stored rotated). A group's arguments are built once and
kept while the group lives (`_plan`; groups are replaced, never edited, when blocks are packed, freed or
rows selected). Tested on the CPU with ``TRITON_INTERPRET=1`` against the reference reader; timed on a GPU
when one is available.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

from kvstream.kernels.cpu import group_args
from kvstream.kernels.online import OnlineSoftmax

TILE_ELEMENTS = 4096
"""Elements of one sub-tile (tokens x head_dim): 32 tokens of a 128-wide head, 64 of a 64-wide one, so a
program's key, value and RoPE tiles stay in registers."""
PROGRAMS_PER_SM = 2
"""Programs launched per streaming multiprocessor (a group's sub-tiles shared among them in equal runs): as
many as are resident at once (the kernel takes about 255 registers a thread, two programs of 4 warps per
SM on sm_90), so the GPU runs one wave with no tail while the partials to merge stay few."""
INTERPRETED_PROGRAMS = 4
"""Programs per launch without a GPU (Triton's interpreter): few, so each one runs over sub-tiles of
several blocks, the path long histories take on a GPU."""
MERGE_ELEMENTS = 4096
"""Elements of one tile of partials (partials x head_dim) the merge reads at a time."""
TINY = torch.finfo(torch.float32).tiny


@triton.jit
def _word(codes, limit, first, ok, BITS: tl.constexpr, GROUP: tl.constexpr, ALIGNED: tl.constexpr, WORDS: tl.constexpr):
    """The bits of codes ``first .. first + GROUP - 1`` of a little-endian stream of ``BITS``-wide codes (from
    ``codes``, a block's first byte or word), from bit 0, for every group start ``first`` ([X, Y] int32):
    [X, Y] int32.

    With ``WORDS`` the stream is read as 32-bit words and a group is one word (one load); when every group
    starts on a byte (``ALIGNED``) its bytes are loaded, else the bytes its bits touch (none at or past
    ``limit``), shifted. Groups never cross a row's end; those not ``ok`` read as 0 and load nothing, so a
    lane of the other precision part never addresses outside this one."""
    bit = first * BITS
    if WORDS:
        word = tl.load(codes + (bit >> 5), mask=ok, other=0)
    elif ALIGNED:
        byte = bit >> 3
        word = tl.zeros(first.shape, tl.int32)
        for i in tl.static_range(GROUP * BITS // 8):
            word |= tl.load(codes + byte + i, mask=ok, other=0).to(tl.int32) << (8 * i)
    else:
        byte = bit >> 3
        word = tl.zeros(first.shape, tl.int32)
        for i in tl.static_range((GROUP * BITS + 14) // 8):
            word |= tl.load(codes + byte + i, mask=ok & (byte + i < limit), other=0).to(tl.int32) << (8 * i)
        word = word >> (bit & 7)
    return word


@triton.jit
def _spread(
    word,
    table,
    s,
    z,
    FIRST: tl.constexpr,
    STEP: tl.constexpr,
    COUNT: tl.constexpr,
    BITS: tl.constexpr,
    TABLE: tl.constexpr,
):
    """Values ``level * s + z`` of codes ``FIRST, FIRST + STEP, ..`` (``COUNT`` of them) of every group ``word``,
    in trailing dimensions of 2 held by each thread, so that flattening them lists the codes in stream order.

    A code stands for itself (uniform) or its entry of the level ``table``."""
    if COUNT == 1:
        code = (word >> (FIRST * BITS)) & ((1 << BITS) - 1)
        level = tl.load(table + code) if TABLE else code.to(tl.float32)
        out = level * s + z
    else:
        evens = _spread(word, table, s, z, FIRST, STEP * 2, COUNT // 2, BITS, TABLE)
        odds = _spread(word, table, s, z, FIRST + STEP, STEP * 2, COUNT // 2, BITS, TABLE)
        out = tl.join(evens, odds)
    return out


@triton.jit
def _dot(a, b, acc):
    """``acc + a @ b`` in about fp32's accuracy on tf32 tensor cores: each operand is cut into a part tf32 holds
    exactly (its top 10 mantissa bits) and the rest, and three tf32 products are summed (the product of the two
    rests is below fp32's rounding; a relative error near 1e-6, where one tf32 product errs by 1e-3). On sm_90
    this issues about a sixth fewer instructions per token than Triton's "tf32x3", which also guards
    infinities and NaNs the kernel never feeds it. Triton's interpreter computes the products in fp32."""
    a_big = (a.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    b_big = (b.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    acc = tl.dot(a - a_big, b_big, acc, input_precision="tf32")
    acc = tl.dot(a_big, b - b_big, acc, input_precision="tf32")
    return tl.dot(a_big, b_big, acc, input_precision="tf32")


@triton.jit
def _scale(scale, meta, ok, LOG: tl.constexpr):
    """Scales of the ranges at ``meta`` in fp32 (0 where not ``ok``): stored fp16 or fp32, or 8-bit logarithmic
    codes ``c`` standing for ``2 ** (c / 12 - 14)`` (`kvstream.quant.scales.log_scale_table`)."""
    if LOG:
        code = tl.load(scale + meta, mask=ok, other=0).to(tl.float32)
        sc = tl.where(ok, tl.exp2(code / 12.0 - 14.0), 0.0)
    else:
        sc = tl.load(scale + meta, mask=ok, other=0.0).to(tl.float32)
    return sc


@triton.jit
def _zero(zero, meta, ok, s, BITS: tl.constexpr, SYM: tl.constexpr, TABLE: tl.constexpr):
    """Zero-points of the ranges at ``meta``: stored, or minus the middle level times the scale when symmetric
    (0 under a level table, whose levels are centred)."""
    if SYM and TABLE:
        z = 0.0 * s
    elif SYM:
        z = -((1 << (BITS - 1)) - 1) * s
    else:
        z = tl.load(zero + meta, mask=ok, other=0.0).to(tl.float32)
    return z


@triton.jit
def _key_part(
    codes,
    scale,
    zero,
    table,
    nbytes,
    codes_step,
    meta_step,
    s,
    row,
    own,
    t0,
    T,
    KG,
    ROWS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    ONE_RANGE: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    ALIGNED: tl.constexpr,
    WORDS: tl.constexpr,
    SYM: tl.constexpr,
    TABLE: tl.constexpr,
    LOG: tl.constexpr,
):
    """[ROWS, BLOCK_T] keys of one part in block ``s``: channel rows ``row`` of the block ([ROWS]; this part's
    where ``own``, 0 elsewhere), tokens ``t0 ..``; a key row is one channel over the block's ``T`` tokens, with
    ``KG`` ranges along it (one: a scale per channel, applied per group of codes). A block's codes and ranges
    start ``codes_step`` and ``meta_step`` entries after the previous block's."""
    NG: tl.constexpr = BLOCK_T // GROUP
    start = t0 + tl.arange(0, NG) * GROUP
    ok = own[:, None] & (start < T)[None, :]
    block = codes + s * codes_step
    limit = nbytes - s * codes_step
    word = _word(block, limit, row[:, None] * T + start[None, :], ok, BITS, GROUP, ALIGNED, WORDS)
    scale = scale + s * meta_step
    zero = zero + s * meta_step
    if ONE_RANGE:
        sc = _scale(scale, row, own, LOG)
        z = _zero(zero, row, own, sc, BITS, SYM, TABLE)
        keys = tl.reshape(_spread(word, table, sc[:, None], z[:, None], 0, 1, GROUP, BITS, TABLE), (ROWS, BLOCK_T))
    else:
        levels = tl.reshape(_spread(word, table, 1.0, 0.0, 0, 1, GROUP, BITS, TABLE), (ROWS, BLOCK_T))
        t = t0 + tl.arange(0, BLOCK_T)
        meta = row[:, None] * KG + t[None, :] // (T // KG)
        meta_ok = own[:, None] & (t < T)[None, :]
        sc = _scale(scale, meta, meta_ok, LOG)
        keys = levels * sc + _zero(zero, meta, meta_ok, sc, BITS, SYM, TABLE)
    return keys


@triton.jit
def _high_scores(
    scores,
    q_rows,
    scaling,
    kc,
    ks,
    kz,
    kt,
    kn,
    codes_step,
    meta_step,
    units_hi,
    kinv,
    ocos,
    osin,
    bcos,
    bsin,
    s,
    b,
    bh,
    B,
    BH,
    t0,
    T,
    KG,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_T: tl.constexpr,
    KH_PAD: tl.constexpr,
    ROTATE: tl.constexpr,
    ONE_RANGE: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    ALIGNED: tl.constexpr,
    WORDS: tl.constexpr,
    SYM: tl.constexpr,
    TABLE: tl.constexpr,
    LOG: tl.constexpr,
):
    """``scores`` plus the high-precision key channels' share, read compactly: the block's ``units_hi`` high rows
    as a [KH_PAD, BLOCK_T] tile, ``kinv`` naming each one's channel (-1: a padding row).

    Unrotated, the share is the queries at those channels times the tile. Under RoPE a channel ``c`` of the first
    half (``c + HALF`` of the second) pairs with its partner as the low channels do: with the turned queries
    ``ua``, ``ub`` at ``c``, its coefficient is ``ua * cos + ub * sin`` (``ub * cos - ua * sin``) of its place in
    the sub-tile, so the share is two products of [R_PAD, KH_PAD] factors with the tile times cos and sin."""
    i = tl.arange(0, KH_PAD)
    rows = tl.arange(0, R_PAD)
    channel = tl.load(kinv + (s * BH + bh) * units_hi + i, mask=i < units_hi, other=-1)
    own = channel >= 0
    keys = _key_part(
        kc, ks, kz, kt, kn, codes_step, meta_step, s, bh * units_hi + i, own, t0, T, KG,
        KH_PAD, BLOCK_T, ONE_RANGE, BITS, GROUP, ALIGNED, WORDS, SYM, TABLE, LOG,
    )  # fmt: skip
    take = (rows < R)[:, None] & own[None, :]
    if ROTATE:
        pair = tl.where(own, channel % HALF, 0)
        second = channel >= HALF
        j = tl.arange(0, BLOCK_T)
        places = own[:, None] & (j < T)[None, :]
        oc = tl.load(ocos + pair[:, None] * T + j[None, :], mask=places, other=0.0)
        os = tl.load(osin + pair[:, None] * T + j[None, :], mask=places, other=0.0)
        qa = tl.load(q_rows + pair[None, :], mask=take, other=0.0).to(tl.float32) * scaling
        qb = tl.load(q_rows + HALF + pair[None, :], mask=take, other=0.0).to(tl.float32) * scaling
        base = (s * B + b) * (2 * HALF)
        oc0 = tl.load(ocos + pair * T + t0, mask=own, other=0.0)
        os0 = tl.load(osin + pair * T + t0, mask=own, other=0.0)
        bca = tl.load(bcos + base + pair, mask=own, other=0.0)
        bsa = tl.load(bsin + base + pair, mask=own, other=0.0)
        bcb = tl.load(bcos + base + HALF + pair, mask=own, other=0.0)
        bsb = tl.load(bsin + base + HALF + pair, mask=own, other=0.0)
        ua = qa * (bca * oc0 - bsa * os0)[None, :] + qb * (bsb * oc0 + bcb * os0)[None, :]
        ub = qb * (bcb * oc0 - bsb * os0)[None, :] - qa * (bsa * oc0 + bca * os0)[None, :]
        with_cos = tl.where(second[None, :], ub, ua)
        with_sin = tl.where(second[None, :], -ua, ub)
        scores = _dot(with_cos, keys * oc, scores)
        scores = _dot(with_sin, keys * os, scores)
    else:
        qh = tl.load(q_rows + channel[None, :], mask=take, other=0.0).to(tl.float32) * scaling
        scores = _dot(qh, keys, scores)
    return scores


@triton.jit
def _low_keys(
    kc,
    ks,
    kz,
    kt,
    kn,
    codes_step,
    meta_step,
    units,
    units_hi,
    kslot,
    s,
    bh,
    BH,
    channel,
    valid,
    t0,
    T,
    KG,
    D: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    ONE_RANGE: tl.constexpr,
    K_SPLIT: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    ALIGNED: tl.constexpr,
    WORDS: tl.constexpr,
    SYM: tl.constexpr,
    TABLE: tl.constexpr,
    LOG: tl.constexpr,
):
    """[ROWS, BLOCK_T] keys of ``channel`` ([ROWS]; rows not ``valid`` pad a half to the tensor cores' 16) from
    the normal-precision part (0 in high channels, whose share `_high_scores` adds)."""
    if K_SPLIT:
        slot = tl.load(kslot + (s * BH + bh) * D + channel, mask=valid, other=0).to(tl.int32)
    else:
        slot = channel + units_hi
    own = valid & (slot >= units_hi)
    return _key_part(
        kc, ks, kz, kt, kn, codes_step, meta_step, s, bh * units + slot - units_hi, own, t0, T, KG,
        ROWS, BLOCK_T, ONE_RANGE, BITS, GROUP, ALIGNED, WORDS, SYM, TABLE, LOG,
    )  # fmt: skip


@triton.jit
def _value_part(
    codes,
    scale,
    zero,
    table,
    nbytes,
    codes_step,
    meta_step,
    units,
    units_hi,
    vslot,
    s,
    bh,
    BH,
    t,
    t_ok,
    T,
    U,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    V_SPLIT: tl.constexpr,
    HIGH: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    ALIGNED: tl.constexpr,
    WORDS: tl.constexpr,
    SYM: tl.constexpr,
    TABLE: tl.constexpr,
    LOG: tl.constexpr,
):
    """[BLOCK_T, D] values of one part at tokens ``t`` of block ``s``, batch row and head ``bh`` of ``BH``
    (0 in the other part's channels).

    A value row is one unit (``U`` channels) over the block's tokens, ``t * U + channel % U`` along it, one range
    per token; codes are unpacked ``GROUP`` channels at a time (``GROUP`` divides ``U``)."""
    NG: tl.constexpr = D // GROUP
    channel = tl.arange(0, NG) * GROUP
    unit = channel // U
    slot = tl.load(vslot + (s * BH + bh) * (D // U) + unit).to(tl.int32) if V_SPLIT else unit + units_hi
    if HIGH:
        own = slot < units_hi
        row = bh * units + slot
    else:
        own = slot >= units_hi
        row = bh * units + slot - units_hi
    ok = t_ok[:, None] & own[None, :]
    first = row[None, :] * (T * U) + (t * U)[:, None] + (channel - unit * U)[None, :]
    word = _word(codes + s * codes_step, nbytes - s * codes_step, first, ok, BITS, GROUP, ALIGNED, WORDS)
    meta = row[None, :] * T + t[:, None]
    sc = _scale(scale + s * meta_step, meta, ok, LOG)
    z = _zero(zero + s * meta_step, meta, ok, sc, BITS, SYM, TABLE)
    return tl.reshape(_spread(word, table, sc, z, 0, 1, GROUP, BITS, TABLE), (BLOCK_T, D))


@triton.jit
def _block_kernel(
    q,
    q_sb,
    q_sh,
    q_sr,
    scaling,
    visible,
    vis_sb,
    m_out,
    l_out,
    acc_out,
    B,
    H,
    chunks,
    programs,
    kc_hi,
    ks_hi,
    kz_hi,
    kt_hi,
    kn_hi,
    kstep_hi,
    kmeta_hi,
    kunits_hi,
    kc_lo,
    ks_lo,
    kz_lo,
    kt_lo,
    kn_lo,
    kstep_lo,
    kmeta_lo,
    kunits_lo,
    kslot,
    kinv,
    vc_hi,
    vs_hi,
    vz_hi,
    vt_hi,
    vn_hi,
    vstep_hi,
    vmeta_hi,
    vunits_hi,
    vc_lo,
    vs_lo,
    vz_lo,
    vt_lo,
    vn_lo,
    vstep_lo,
    vmeta_lo,
    vunits_lo,
    vslot,
    ocos,
    osin,
    bcos,
    bsin,
    T,
    start,
    U,
    KG,
    D: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    KH_PAD: tl.constexpr,
    ROTATE: tl.constexpr,
    ONE_RANGE: tl.constexpr,
    K_SPLIT: tl.constexpr,
    V_SPLIT: tl.constexpr,
    K_HI: tl.constexpr,
    K_LO: tl.constexpr,
    V_HI: tl.constexpr,
    V_LO: tl.constexpr,
    KB_HI: tl.constexpr,
    KG_HI: tl.constexpr,
    KA_HI: tl.constexpr,
    KW_HI: tl.constexpr,
    KS_HI: tl.constexpr,
    KT_HI: tl.constexpr,
    KL_HI: tl.constexpr,
    KB_LO: tl.constexpr,
    KG_LO: tl.constexpr,
    KA_LO: tl.constexpr,
    KW_LO: tl.constexpr,
    KS_LO: tl.constexpr,
    KT_LO: tl.constexpr,
    KL_LO: tl.constexpr,
    VB_HI: tl.constexpr,
    VG_HI: tl.constexpr,
    VA_HI: tl.constexpr,
    VW_HI: tl.constexpr,
    VS_HI: tl.constexpr,
    VT_HI: tl.constexpr,
    VL_HI: tl.constexpr,
    VB_LO: tl.constexpr,
    VG_LO: tl.constexpr,
    VA_LO: tl.constexpr,
    VW_LO: tl.constexpr,
    VS_LO: tl.constexpr,
    VT_LO: tl.constexpr,
    VL_LO: tl.constexpr,
):
    """One program: sub-tiles ``[p * chunks / programs, (p + 1) * chunks / programs)`` of the group's blocks
    (``chunks`` in all, block-major) for batch row and KV head ``bh``; writes its ``(max, sum, acc)`` of the
    ``R`` grouped queries (padded to ``R_PAD`` rows for the tensor cores). Per part of keys and values: codes,
    scales, zero-points, level table, bytes, codes and ranges per block, units; constexprs: bits, codes per
    window, aligned, read as words, symmetric, table, 8-bit scales."""
    p = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1)
    BH = B * H
    b = bh // H
    h = bh % H
    first = p * chunks // programs
    last = (p + 1) * chunks // programs
    per_block = (T + BLOCK_T - 1) // BLOCK_T
    rows = tl.arange(0, R_PAD)
    ca = tl.arange(0, HALF_PAD)
    cb = ca + HALF
    c_ok = ca < HALF
    d = tl.arange(0, D)
    q_rows = q + b * q_sb + h * q_sh + rows[:, None] * q_sr
    q_ok = (rows < R)[:, None] & c_ok[None, :]
    qa = tl.load(q_rows + ca[None, :], mask=q_ok, other=0.0).to(tl.float32) * scaling
    qb = tl.load(q_rows + cb[None, :], mask=q_ok, other=0.0).to(tl.float32) * scaling
    m_i = tl.full([R_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([R_PAD], tl.float32)
    acc = tl.zeros([R_PAD, D], tl.float32)
    if ROTATE:
        # RoPE at p0 + t0 + j by angle addition, split: the keys turn by their place j in the sub-tile (the same
        # table for every sub-tile), the queries by the sub-tile's first position p0 + t0
        j = tl.arange(0, BLOCK_T)
        places = c_ok[:, None] & (j < T)[None, :]
        oc = tl.load(ocos + ca[:, None] * T + j[None, :], mask=places, other=0.0)
        os = tl.load(osin + ca[:, None] * T + j[None, :], mask=places, other=0.0)
    for c in range(first, last):
        s = c // per_block
        t0 = ((c - s * per_block) * BLOCK_T).to(tl.int32)
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < T
        seen = t_ok & (tl.load(visible + b * vis_sb + start + s * T + t, mask=t_ok, other=0) != 0)
        scores = tl.zeros([R_PAD, BLOCK_T], tl.float32)
        if K_LO:
            ka = _low_keys(
                kc_lo, ks_lo, kz_lo, kt_lo, kn_lo, kstep_lo, kmeta_lo, kunits_lo, kunits_hi, kslot, s, bh, BH,
                ca, c_ok, t0, T, KG, D, HALF_PAD, BLOCK_T, ONE_RANGE, K_SPLIT,
                KB_LO, KG_LO, KA_LO, KW_LO, KS_LO, KT_LO, KL_LO,
            )  # fmt: skip
            kb = _low_keys(
                kc_lo, ks_lo, kz_lo, kt_lo, kn_lo, kstep_lo, kmeta_lo, kunits_lo, kunits_hi, kslot, s, bh, BH,
                cb, c_ok, t0, T, KG, D, HALF_PAD, BLOCK_T, ONE_RANGE, K_SPLIT,
                KB_LO, KG_LO, KA_LO, KW_LO, KS_LO, KT_LO, KL_LO,
            )  # fmt: skip
            if ROTATE:
                ra = ka * oc - kb * os
                rb = kb * oc + ka * os
                ka = ra
                kb = rb
                base = (s * B + b) * D
                oc0 = tl.load(ocos + ca * T + t0, mask=c_ok, other=0.0)
                os0 = tl.load(osin + ca * T + t0, mask=c_ok, other=0.0)
                bca = tl.load(bcos + base + ca, mask=c_ok, other=0.0)
                bsa = tl.load(bsin + base + ca, mask=c_ok, other=0.0)
                bcb = tl.load(bcos + base + cb, mask=c_ok, other=0.0)
                bsb = tl.load(bsin + base + cb, mask=c_ok, other=0.0)
                ua = qa * (bca * oc0 - bsa * os0)[None, :] + qb * (bsb * oc0 + bcb * os0)[None, :]
                ub = qb * (bcb * oc0 - bsb * os0)[None, :] - qa * (bsa * oc0 + bca * os0)[None, :]
            else:
                ua = qa
                ub = qb
            scores = _dot(ub, kb, _dot(ua, ka, scores))
        if K_HI:
            scores = _high_scores(
                scores, q_rows, scaling,
                kc_hi, ks_hi, kz_hi, kt_hi, kn_hi, kstep_hi, kmeta_hi, kunits_hi, kinv, ocos, osin, bcos, bsin,
                s, b, bh, B, BH, t0, T, KG, R, R_PAD, HALF, BLOCK_T, KH_PAD, ROTATE, ONE_RANGE,
                KB_HI, KG_HI, KA_HI, KW_HI, KS_HI, KT_HI, KL_HI,
            )  # fmt: skip
        scores = tl.where(seen[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        prob = tl.exp(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(prob, axis=1)
        v = tl.zeros([BLOCK_T, D], tl.float32)
        if V_HI:
            v += _value_part(
                vc_hi, vs_hi, vz_hi, vt_hi, vn_hi, vstep_hi, vmeta_hi, vunits_hi, vunits_hi, vslot, s, bh, BH,
                t, t_ok, T, U, D, BLOCK_T, V_SPLIT, True, VB_HI, VG_HI, VA_HI, VW_HI, VS_HI, VT_HI, VL_HI,
            )  # fmt: skip
        if V_LO:
            v += _value_part(
                vc_lo, vs_lo, vz_lo, vt_lo, vn_lo, vstep_lo, vmeta_lo, vunits_lo, vunits_hi, vslot, s, bh, BH,
                t, t_ok, T, U, D, BLOCK_T, V_SPLIT, False, VB_LO, VG_LO, VA_LO, VW_LO, VS_LO, VT_LO, VL_LO,
            )  # fmt: skip
        acc = _dot(prob, v, acc * alpha[:, None])
        m_i = m_new
    slot_out = (p * BH + bh) * R + rows
    ok = rows < R
    tl.store(m_out + slot_out, m_i, mask=ok)
    tl.store(l_out + slot_out, l_i, mask=ok)
    tl.store(acc_out + slot_out[:, None] * D + d[None, :], acc, mask=ok[:, None])


@triton.jit
def _exact(
    q,
    keys,
    values,
    visible,
    n,
    k_sb,
    k_sh,
    k_st,
    v_sb,
    v_sh,
    v_st,
    vis_sb,
    vis_st,
    b,
    h,
    m,
    norm,
    acc,
    D: tl.constexpr,
    TILE: tl.constexpr,
    MASKED: tl.constexpr,
):
    """``(m, norm, acc)`` of one query row with the ``n`` exact tokens of a segment folded in (keys and values
    [B, H, n, D] of any float dtype, read in fp32; where ``MASKED``, only tokens ``visible`` [B, n])."""
    d = tl.arange(0, D)
    for first in range(0, n, TILE):
        t = first + tl.arange(0, TILE)
        ok = t < n
        k = tl.load(keys + b * k_sb + h * k_sh + t[:, None] * k_st + d[None, :], mask=ok[:, None], other=0.0)
        score = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        if MASKED:
            ok = ok & (tl.load(visible + b * vis_sb + t * vis_st, mask=ok, other=0) != 0)
        score = tl.where(ok, score, float("-inf"))
        m_new = tl.maximum(m, tl.max(score, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        prob = tl.exp(score - m_safe)
        v = tl.load(values + b * v_sb + h * v_sh + t[:, None] * v_st + d[None, :], mask=ok[:, None], other=0.0)
        norm = norm * alpha + tl.sum(prob, axis=0)
        acc = acc * alpha + tl.sum(prob[:, None] * v.to(tl.float32), axis=0)
        m = m_new
    return m, norm, acc


@triton.jit
def _merge_kernel(
    m_in,
    l_in,
    acc_in,
    partials,
    q,
    q_sb,
    q_sh,
    q_sr,
    scaling,
    sink_k,
    sink_v,
    sink_vis,
    n_sink,
    sk_sb,
    sk_sh,
    sk_st,
    sv_sb,
    sv_sh,
    sv_st,
    svis_sb,
    svis_st,
    tail_k,
    tail_v,
    tail_vis,
    n_tail,
    tk_sb,
    tk_sh,
    tk_st,
    tv_sb,
    tv_sh,
    tv_st,
    tvis_sb,
    tvis_st,
    out,
    o_sb,
    o_sh,
    o_sr,
    m_out,
    l_out,
    H,
    R,
    tiny,
    D: tl.constexpr,
    TILE: tl.constexpr,
    EXACT_TILE: tl.constexpr,
    SINKS: tl.constexpr,
    TAIL: tl.constexpr,
    TAIL_MASKED: tl.constexpr,
    FINAL: tl.constexpr,
):
    """One query row ``(b * H + h) * R + r``: its ``partials`` block partials ([P, B * H * R] and
    [P, B * H * R, D]) merged by the log-sum-exp rule, then the sink copies and the tail read exactly; written
    as the attention output (``FINAL``, in ``out``'s dtype at strides ``o_*``) or as ``(acc, max, sum)``."""
    row = tl.program_id(0)
    rows_all = tl.num_programs(0)
    r = row % R
    bh = row // R
    b = bh // H
    h = bh % H
    d = tl.arange(0, D)
    m = tl.full([], float("-inf"), tl.float32)
    norm = tl.zeros([], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for first in range(0, partials, TILE):
        i = (first + tl.arange(0, TILE)).to(tl.int64)
        ok = i < partials
        slot = i * rows_all + row
        mp = tl.load(m_in + slot, mask=ok, other=float("-inf"))
        lp = tl.load(l_in + slot, mask=ok, other=0.0)
        ap = tl.load(acc_in + slot[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(mp, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        weight = tl.exp(mp - m_safe)
        norm = norm * alpha + tl.sum(lp * weight, axis=0)
        acc = acc * alpha + tl.sum(ap * weight[:, None], axis=0)
        m = m_new
    if SINKS or TAIL:
        query = tl.load(q + b * q_sb + h * q_sh + r * q_sr + d).to(tl.float32) * scaling
        if SINKS:
            m, norm, acc = _exact(
                query, sink_k, sink_v, sink_vis, n_sink, sk_sb, sk_sh, sk_st, sv_sb, sv_sh, sv_st, svis_sb, svis_st,
                b, h, m, norm, acc, D, EXACT_TILE, True,
            )  # fmt: skip
        if TAIL:
            m, norm, acc = _exact(
                query, tail_k, tail_v, tail_vis, n_tail, tk_sb, tk_sh, tk_st, tv_sb, tv_sh, tv_st, tvis_sb, tvis_st,
                b, h, m, norm, acc, D, EXACT_TILE, TAIL_MASKED,
            )  # fmt: skip
    if FINAL:
        result = acc / tl.maximum(norm, tiny)
        tl.store(out + b * o_sb + h * o_sh + r * o_sr + d, result.to(out.dtype.element_ty))
    else:
        tl.store(out + row * D + d, acc)
        tl.store(m_out + row, m)
        tl.store(l_out + row, norm)


# -- host side ------------------------------------------------------------------------------------------------


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _window(bits: int, rows_on_bytes: bool, limit: int) -> tuple[int, bool]:
    """(codes unpacked per window, aligned) of a part: a 4-byte window serves 32 bits of codes when every group
    of them starts on a byte, else 25 (the rest is the shift); a power of two, at most ``limit``."""
    if rows_on_bytes:
        group = min(_pow2_floor(32 // bits), limit)
        if group * bits % 8 == 0:
            return group, True
    return min(_pow2_floor(25 // bits), limit), False


class _Dummies:
    """One-element stand-ins for absent tensors, made once per device."""

    _made: dict[torch.device, dict[torch.dtype, torch.Tensor]] = {}

    @classmethod
    def of(cls, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        per_device = cls._made.setdefault(device, {})
        if dtype not in per_device:
            per_device[dtype] = torch.zeros(1, dtype=dtype, device=device)
        return per_device[dtype]


def _part(
    tensors: list[torch.Tensor],
    table: torch.Tensor,
    bits: int,
    units: int,
    blocks: int,
    limit: int,
    row_len: int,
    name: str,
) -> tuple[list[Any], dict[str, Any]]:
    """Kernel arguments ``codes, scale, zero, table, bytes, codes per block, ranges per block, units`` and
    constexprs (``{store}B_{part}`` bits, ``G`` codes per window, ``A`` aligned, ``W`` read as 32-bit words,
    ``S`` symmetric, ``T`` table, ``L`` 8-bit logarithmic scales) of one precision part ``name`` (``"K_HI"``
    ...) of ``blocks`` blocks: ``row_len`` codes of a row decide alignment, ``limit`` caps the codes per
    window. Codes whose groups are whole 4-byte-aligned words are passed as int32 words."""
    codes, scale, zero = tensors
    device = codes.device
    store, part = name.split("_")
    if codes.numel() == 0:
        dummy = _Dummies.of(device, torch.float32)
        flags = {"B": 8, "G": 1, "A": True, "W": False, "S": True, "T": False, "L": False}
        args = [_Dummies.of(device, torch.uint8), dummy, dummy, dummy, 0, 0, 0, 0]
    else:
        block_bytes, block_meta = codes.numel() // blocks, scale.numel() // blocks
        if 8 * block_bytes >= 2**31:
            raise ValueError(f"a block of {block_bytes} bytes per part is beyond the Triton kernel's 32-bit offsets")
        group, aligned = _window(bits, row_len * bits % 8 == 0, limit)
        words = aligned and group * bits == 32 and codes.data_ptr() % 4 == 0 and block_bytes % 4 == 0
        words = words and codes.numel() % 4 == 0
        flags = {"B": bits, "G": group, "A": aligned, "W": words, "S": zero.numel() == 0, "T": table.numel() > 0}
        flags["L"] = scale.dtype == torch.uint8
        level = table.to(device) if table.numel() else _Dummies.of(device, torch.float32)
        stream = codes.view(torch.int32) if words else codes
        step = block_bytes // 4 if words else block_bytes
        zeros = zero.contiguous() if zero.numel() else scale
        args = [stream, scale.contiguous(), zeros, level, codes.numel(), step, block_meta, units]
    return args, {f"{store}{letter}_{part}": value for letter, value in flags.items()}


def _high_channels(position: torch.Tensor, units_hi: int) -> torch.Tensor:
    """The channel of each high-precision slot ([S, B, H, units_hi] int32; -1 for a padding slot) from the slot of
    each channel ([S, B, H, D])."""
    slots = position.long()
    high = slots < units_hi
    index = torch.where(high, slots, units_hi)
    channels = torch.arange(slots.shape[-1], dtype=torch.int32, device=slots.device).expand_as(slots)
    inverse = torch.full((*slots.shape[:-1], units_hi + 1), -1, dtype=torch.int32, device=slots.device)
    return inverse.scatter_(-1, index, channels)[..., :units_hi].contiguous()


def _kept(store: dict[int, tuple[weakref.ref, Any]], owner: Any) -> Any:
    """What ``store`` keeps for ``owner`` (None if nothing)."""
    entry = store.get(id(owner))
    return entry[1] if entry is not None and entry[0]() is owner else None


def _keep(store: dict[int, tuple[weakref.ref, Any]], owner: Any, value: Any) -> Any:
    """Keep ``value`` in ``store`` for as long as ``owner`` lives (dropped with it, never keeping it alive)."""
    key = id(owner)

    def drop(ref: weakref.ref) -> None:
        if key in store and store[key][0] is ref:
            del store[key]

    store[key] = (weakref.ref(owner, drop), value)
    return value


@dataclass
class _GroupPlan:
    """A block group's arguments as `_block_kernel` takes them, built once per group object."""

    args: list[Any]
    flags: dict[str, Any]
    blocks: int
    block_len: int
    head_dim: int
    codes_ptr: int
    launches: dict[tuple[int, ...], tuple[int, int, int, int]] = field(default_factory=dict)

    def geometry(self, rows: int, device: torch.device) -> tuple[int, int, int, int]:
        """``(BLOCK_T, sub-tiles, programs per batch row and head, warps)`` for ``rows`` batch rows x KV heads:
        sub-tiles of `TILE_ELEMENTS` (at least 16 tokens, at most the block rounded up to a power of two), and
        about `_target_programs` programs in all, each taking an equal run of a row's sub-tiles."""
        target = _target_programs(device)
        key = (rows, target, TILE_ELEMENTS)
        if key not in self.launches:
            widest = _pow2_floor(max(1, TILE_ELEMENTS // self.head_dim))
            block_t = max(16, min(widest, triton.next_power_of_2(self.block_len)))
            chunks = self.blocks * -(-self.block_len // block_t)
            programs = max(1, min(chunks, round(target / rows)))
            warps = max(1, min(4, block_t * self.head_dim // 1024))
            self.launches[key] = (block_t, chunks, programs, warps)
        return self.launches[key]


_PLANS: dict[int, tuple[weakref.ref, _GroupPlan]] = {}
"""The `_GroupPlan` of every live block group, by group."""


def _plan(layer: Any, group: Any) -> _GroupPlan:
    """The kept `_GroupPlan` of ``group`` (built on first use; dropped with the group, never holding its bytes)."""
    plan = _kept(_PLANS, group)
    if plan is not None and plan.blocks == group.n_blocks and plan.codes_ptr == _codes_ptr(group):
        return plan
    return _keep(_PLANS, group, _build_plan(layer, group))


def _codes_ptr(group: Any) -> int:
    part = group.keys.low if group.keys.low is not None else group.keys.high
    return part.codes.data_ptr()


def _build_plan(layer: Any, group: Any) -> _GroupPlan:
    (tensors,), (meta,) = group_args(layer, [group])
    s, t, start = meta[0], meta[1], meta[2]
    u, kg = meta[11], meta[12]
    d = layer.keys.shape[-1]
    device = layer.keys.device
    key_limit, value_limit = min(16, t & -t), u & -u  # a window never crosses a row's end
    k_hi, f_k_hi = _part(tensors[0:3], tensors[14], *meta[3:5], s, key_limit, t, "K_HI")
    k_lo, f_k_lo = _part(tensors[3:6], tensors[15], *meta[5:7], s, key_limit, t, "K_LO")
    v_hi, f_v_hi = _part(tensors[7:10], tensors[16], *meta[7:9], s, value_limit, u, "V_HI")
    v_lo, f_v_lo = _part(tensors[10:13], tensors[17], *meta[9:11], s, value_limit, u, "V_LO")
    k_slot, v_slot = tensors[6], tensors[13]
    rotate = len(tensors) >= 22  # after the stores (0-13) and their level tables (14-17)
    dummy = _Dummies.of(device, torch.float32)
    rope = [table.contiguous() for table in tensors[18:22]] if rotate else [dummy] * 4
    slot_dummy = _Dummies.of(device, torch.int16)
    high = _high_channels(k_slot, meta[4]) if k_slot.numel() else _Dummies.of(device, torch.int32)
    args = [
        *k_hi, *k_lo, k_slot if k_slot.numel() else slot_dummy, high,
        *v_hi, *v_lo, v_slot if v_slot.numel() else slot_dummy,
        *rope, t, start, u, kg,
    ]  # fmt: skip
    flags = {
        "D": d, "HALF": d // 2, "HALF_PAD": max(16, d // 2), "ROTATE": rotate, "ONE_RANGE": kg == 1,
        "KH_PAD": max(16, triton.next_power_of_2(meta[4])),
        "K_SPLIT": k_slot.numel() > 0, "V_SPLIT": v_slot.numel() > 0,
        "K_HI": meta[4] > 0, "K_LO": meta[6] > 0, "V_HI": meta[8] > 0, "V_LO": meta[10] > 0,
        **f_k_hi, **f_k_lo, **f_v_hi, **f_v_lo,
    }  # fmt: skip
    return _GroupPlan(args, flags, s, t, d, _codes_ptr(group))


def _target_programs(device: torch.device) -> int:
    """Programs one launch aims at: `PROGRAMS_PER_SM` per streaming multiprocessor of a GPU."""
    if device.type != "cuda":
        return INTERPRETED_PROGRAMS
    return PROGRAMS_PER_SM * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


_SMS: dict[int, int] = {}


def _multiprocessors(index: int) -> int:
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


@dataclass
class _Partials:
    """Every program's ``(max, sum, acc)`` of one decode step: [P, B * H * R] and [P, B * H * R, D] fp32."""

    m: torch.Tensor
    norm: torch.Tensor
    acc: torch.Tensor

    @property
    def count(self) -> int:
        return self.m.shape[0]

    def nbytes(self) -> int:
        return 4 * (self.m.numel() + self.norm.numel() + self.acc.numel())


def _block_partials(
    layer: Any, q: torch.Tensor, strides: tuple[int, int, int], rows: int, scaling: float, visible: torch.Tensor
) -> _Partials:
    """Launch `_block_kernel` over every block group of ``layer`` for queries at ``q`` (``strides`` of batch,
    KV head and grouped row; channels contiguous; ``rows`` per KV head), tokens of ``visible`` [B, packed]."""
    batch, kv_heads, d = q.shape[0], layer.keys.shape[1], layer.keys.shape[-1]
    device = q.device
    plans = [_plan(layer, group) for group in layer.groups]
    pairs = batch * kv_heads
    shapes = [plan.geometry(pairs, device) for plan in plans]
    total = sum(shape[2] for shape in shapes)
    width = pairs * rows
    buffer = torch.empty(total * width * (d + 2), device=device)
    m = buffer[: total * width].view(total, width)
    norm = buffer[total * width : 2 * total * width].view(total, width)
    acc = buffer[2 * total * width :].view(total, width, d)
    r_pad = max(16, triton.next_power_of_2(rows))
    offset = 0
    for plan, (block_t, chunks, programs, warps) in zip(plans, shapes, strict=True):
        _block_kernel[(programs, pairs)](
            q, *strides, scaling, visible, visible.stride(0), m[offset:], norm[offset:], acc[offset:],
            batch, kv_heads, chunks, programs, *plan.args,
            R=rows, R_PAD=r_pad, BLOCK_T=block_t, num_warps=warps, **plan.flags,
        )  # fmt: skip
        offset += programs
    return _Partials(m, norm, acc)


@dataclass
class Segment:
    """Exact tokens read beside the blocks: keys and values [B, H, n, D] (fp32 or 16-bit, channels contiguous)
    and which of them each row sees ([B, n] bool, any strides), or None for all."""

    keys: torch.Tensor
    values: torch.Tensor
    visible: torch.Tensor | None


def _segment_args(segment: Segment | None, device: torch.device) -> list[Any]:
    if segment is None or segment.keys.shape[2] == 0:
        dummy = _Dummies.of(device, torch.float32)
        return [dummy, dummy, _Dummies.of(device, torch.bool), 0, 0, 0, 0, 0, 0, 0, 0, 0]
    k, v, seen = _channels_contiguous(segment.keys), _channels_contiguous(segment.values), segment.visible
    visible = [seen, seen.stride(0), seen.stride(1)] if seen is not None else [_Dummies.of(device, torch.bool), 0, 0]
    return [
        k, v, visible[0], k.shape[2], k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *visible[1:],
    ]  # fmt: skip


def _merge(
    parts: _Partials,
    q: torch.Tensor,
    strides: tuple[int, int, int],
    scaling: float,
    heads: tuple[int, int, int],
    sinks: Segment | None = None,
    tail: Segment | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Fold ``parts`` and the exact segments into one row per (batch row, KV head, grouped row) ``heads``:
    written into ``out`` ([B, H * R, 1, D]) as the attention output when given, else returned as
    ``(acc [B, H, R, D], max [B, H, R], sum [B, H, R])``."""
    batch, kv_heads, rows = heads
    d = parts.acc.shape[-1]
    device = parts.acc.device
    width = batch * kv_heads * rows
    final = out is not None
    if final:
        targets = [out, out.stride(0), rows * out.stride(1), out.stride(1), parts.m, parts.m]
    else:
        acc = torch.empty(batch, kv_heads, rows, d, device=device)
        m = torch.empty(batch, kv_heads, rows, device=device)
        norm = torch.empty(batch, kv_heads, rows, device=device)
        targets = [acc, 0, 0, 0, m, norm]
    has_sinks = sinks is not None and sinks.keys.shape[2] > 0
    has_tail = tail is not None and tail.keys.shape[2] > 0
    _merge_kernel[(width,)](
        parts.m, parts.norm, parts.acc, parts.count, q, *strides, scaling,
        *_segment_args(sinks, device), *_segment_args(tail, device), *targets, kv_heads, rows, TINY,
        D=d, TILE=max(1, min(64, MERGE_ELEMENTS // d)), EXACT_TILE=max(1, min(32, MERGE_ELEMENTS // d)),
        SINKS=has_sinks, TAIL=has_tail, TAIL_MASKED=has_tail and tail.visible is not None, FINAL=final,
        num_warps=4 if d >= 64 else 1,
    )  # fmt: skip
    return None if final else (acc, m, norm)


def _channels_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def decode_history(layer: Any, q: torch.Tensor, visible: torch.Tensor, state: OnlineSoftmax) -> None:
    """Fold attention of grouped queries ``q`` ([B, Hkv, R, D] fp32, scaled) over every packed block of ``layer``
    (tokens where ``visible`` [B, packed]) into ``state``, as stored (values in their rotated basis if so)."""
    q = _channels_contiguous(q)
    strides = (q.stride(0), q.stride(1), q.stride(2))
    parts = _block_partials(layer, q, strides, q.shape[2], 1.0, visible)
    state.merge(*_merge(parts, q, strides, 1.0, (q.shape[0], q.shape[1], q.shape[2])))


def _unrotated(
    parts: _Partials, rotation: Any, heads: tuple[int, int, int], merged: tuple[torch.Tensor, ...]
) -> _Partials:
    """The blocks' merged partial with its output rotated back once per head, as a single partial."""
    acc, m, norm = merged
    width = heads[0] * heads[1] * heads[2]
    return _Partials(m.view(1, width), norm.view(1, width), rotation.unrotate(acc).view(1, width, acc.shape[-1]))


def read_history(
    layer: Any, q: torch.Tensor, visible: torch.Tensor, sinks: Segment | None, state: OnlineSoftmax
) -> None:
    """Fold the blocks (values rotated back when stored rotated) and the exact sink copies into ``state`` for
    grouped queries ``q`` ([B, Hkv, R, D] fp32, scaled)."""
    q = _channels_contiguous(q)
    strides = (q.stride(0), q.stride(1), q.stride(2))
    heads = (q.shape[0], q.shape[1], q.shape[2])
    parts = _block_partials(layer, q, strides, heads[2], 1.0, visible)
    rotation = layer.value_rotation()
    if rotation is not None:
        parts = _unrotated(parts, rotation, heads, _merge(parts, q, strides, 1.0, heads))
    state.merge(*_merge(parts, q, strides, 1.0, heads, sinks=sinks))
    state.peak_transient = max(state.peak_transient, parts.nbytes())


def attention(
    layer: Any,
    query: torch.Tensor,
    scaling: float,
    visible: torch.Tensor,
    sinks: Segment | None,
    tail: Segment | None,
) -> tuple[torch.Tensor, int]:
    """Decode attention of ``query`` ([B, Hq, 1, D], the model's) over ``layer``'s blocks (tokens where ``visible``),
    the sink copies and the exact ``tail``: ``([B, 1, Hq, D]`` in the query's dtype, bytes it held on the way).

    The query heads of one KV head are read as its rows in place and scaled in the kernels; the output is
    written by the merge, so a step is one launch per block group and one merge."""
    batch, q_heads, _, d = query.shape
    kv_heads = layer.keys.shape[1]
    rows = q_heads // kv_heads
    query = _channels_contiguous(query)
    strides = (query.stride(0), rows * query.stride(1), query.stride(1))
    heads = (batch, kv_heads, rows)
    parts = _block_partials(layer, query, strides, rows, scaling, visible)
    held = parts.nbytes()
    rotation = layer.value_rotation()
    if rotation is not None:
        parts = _unrotated(parts, rotation, heads, _merge(parts, query, strides, scaling, heads))
        held += 2 * parts.nbytes()
    out = torch.empty(batch, q_heads, 1, d, dtype=query.dtype, device=query.device)
    _merge(parts, query, strides, scaling, heads, sinks, tail, out)
    return out.transpose(1, 2), held + out.numel() * out.element_size()
