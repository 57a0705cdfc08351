"""Decode attention over packed blocks on a GPU, in Triton (split-K: one program per block and KV head).

Each program decodes one block's bit-packed key codes for one (batch row, KV head), dequantizes
them (uniform codes or a level table, key ranges per token group), rotates them by angle addition
from the block's first position (`BlockRope`), scores the
grouped queries, and writes the block's softmax partial (max, sum, unnormalised output from the
value codes). The partials are merged with the log-sum-exp rule; sink copies and the exact tail
are read by the reference code beside it. Tested on the CPU with ``TRITON_INTERPRET=1`` against
the reference reader; timed on a GPU when one is available.
"""

from typing import Any

import torch
import triton
import triton.language as tl

from kvstream.kernels.cpu import group_args
from kvstream.kernels.online import OnlineSoftmax


@triton.jit
def _codes(codes_ptr, nbytes, element, bits):
    """Code ``element`` (a tensor of indices) of a little-endian bit stream of ``bits``-wide codes.

    Indices outside the stream (another part's slots, which the caller discards) read as code 0, never
    past either end of the buffer; bit offsets are 64-bit, so streams beyond 2^31 bits are addressed."""
    bit = element.to(tl.int64) * bits
    byte = bit >> 3
    shift = (bit & 7).to(tl.int32)
    inside = (byte >= 0) & (byte < nbytes)
    low = tl.load(codes_ptr + byte, mask=inside, other=0).to(tl.int32)
    high = tl.load(codes_ptr + byte + 1, mask=inside & (byte + 1 < nbytes), other=0).to(tl.int32)
    return (((high << 8) | low) >> shift) & ((1 << bits) - 1)


@triton.jit
def _dequant(
    codes_hi,
    scale_hi,
    zero_hi,
    nbytes_hi,
    bits_hi,
    units_hi,
    codes_lo,
    scale_lo,
    zero_lo,
    nbytes_lo,
    bits_lo,
    units_lo,
    table_hi,
    table_lo,
    slot,
    sbh,
    element_in_row,
    row_len,
    meta_index_in_row,
    meta_per_row,
    SYM_HI: tl.constexpr,
    SYM_LO: tl.constexpr,
    HAS_HI: tl.constexpr,
    TABLE_HI: tl.constexpr,
    TABLE_LO: tl.constexpr,
    mask,
):
    """Dequantized values of units ``slot`` (high part when ``slot < units_hi``) at ``element_in_row``: a code
    stands for itself (uniform) or for its entry of the part's level table, times the scale, plus the zero."""
    is_hi = slot < units_hi
    row_lo = sbh * units_lo + (slot - units_hi)
    code_lo = _codes(codes_lo, nbytes_lo, row_lo * row_len + element_in_row, bits_lo)
    if TABLE_LO:  # noqa: SIM108 (a branch on a constexpr, resolved when the kernel is compiled)
        value_lo = tl.load(table_lo + code_lo, mask=mask, other=0.0)
    else:
        value_lo = code_lo.to(tl.float32)
    meta_lo = row_lo * meta_per_row + meta_index_in_row
    s_lo = tl.load(scale_lo + meta_lo, mask=mask & (slot >= units_hi), other=0.0).to(tl.float32)
    if SYM_LO and TABLE_LO:
        z_lo = 0.0 * s_lo
    elif SYM_LO:
        z_lo = -((1 << (bits_lo - 1)) - 1) * s_lo
    else:
        z_lo = tl.load(zero_lo + meta_lo, mask=mask & (slot >= units_hi), other=0.0).to(tl.float32)
    out = value_lo * s_lo + z_lo
    if HAS_HI:
        row_hi = sbh * units_hi + slot
        code_hi = _codes(codes_hi, nbytes_hi, row_hi * row_len + element_in_row, bits_hi)
        if TABLE_HI:  # noqa: SIM108
            value_hi = tl.load(table_hi + code_hi, mask=mask & is_hi, other=0.0)
        else:
            value_hi = code_hi.to(tl.float32)
        meta_hi = row_hi * meta_per_row + meta_index_in_row
        s_hi = tl.load(scale_hi + meta_hi, mask=mask & is_hi, other=0.0).to(tl.float32)
        if SYM_HI and TABLE_HI:
            z_hi = 0.0 * s_hi
        elif SYM_HI:
            z_hi = -((1 << (bits_hi - 1)) - 1) * s_hi
        else:
            z_hi = tl.load(zero_hi + meta_hi, mask=mask & is_hi, other=0.0).to(tl.float32)
        out = tl.where(is_hi, value_hi * s_hi + z_hi, out)
    return out


@triton.jit
def _block_kernel(
    q_ptr,
    visible_ptr,
    L,
    kc_hi,
    ks_hi,
    kz_hi,
    kn_hi,
    kbits_hi,
    kunits_hi,
    kc_lo,
    ks_lo,
    kz_lo,
    kn_lo,
    kbits_lo,
    kunits_lo,
    kslot_ptr,
    kt_hi,
    kt_lo,
    vc_hi,
    vs_hi,
    vz_hi,
    vn_hi,
    vbits_hi,
    vunits_hi,
    vc_lo,
    vs_lo,
    vz_lo,
    vn_lo,
    vbits_lo,
    vunits_lo,
    vslot_ptr,
    vt_hi,
    vt_lo,
    ocos,
    osin,
    bcos,
    bsin,
    acc_ptr,
    m_ptr,
    l_ptr,
    B,
    H,
    R,
    T,
    start,
    U,
    KG,
    D: tl.constexpr,
    HALF: tl.constexpr,
    R_PAD: tl.constexpr,
    T_PAD: tl.constexpr,
    ROTATE: tl.constexpr,
    K_SPLIT: tl.constexpr,
    V_SPLIT: tl.constexpr,
    K_SYM_HI: tl.constexpr,
    K_SYM_LO: tl.constexpr,
    V_SYM_HI: tl.constexpr,
    V_SYM_LO: tl.constexpr,
    K_HAS_HI: tl.constexpr,
    V_HAS_HI: tl.constexpr,
    K_TABLE_HI: tl.constexpr,
    K_TABLE_LO: tl.constexpr,
    V_TABLE_HI: tl.constexpr,
    V_TABLE_LO: tl.constexpr,
):
    s = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    sbh = s * B * H + bh
    t = tl.arange(0, T_PAD)
    t_ok = t < T
    r = tl.arange(0, R_PAD)
    r_ok = r < R
    c = tl.arange(0, HALF)
    vis = tl.load(visible_ptr + b * L + start + s * T + t, mask=t_ok, other=0) != 0

    # keys as [T_PAD, HALF] tiles: channels c (first half) and c + HALF (second half)
    ca = c
    cb = c + HALF
    if K_SPLIT:
        slot_a = tl.load(kslot_ptr + sbh * D + ca).to(tl.int32)
        slot_b = tl.load(kslot_ptr + sbh * D + cb).to(tl.int32)
    else:
        slot_a = ca + kunits_hi
        slot_b = cb + kunits_hi
    m2 = t_ok[:, None]
    ka = _dequant(
        kc_hi,
        ks_hi,
        kz_hi,
        kn_hi,
        kbits_hi,
        kunits_hi,
        kc_lo,
        ks_lo,
        kz_lo,
        kn_lo,
        kbits_lo,
        kunits_lo,
        kt_hi,
        kt_lo,
        slot_a[None, :],
        sbh,
        t[:, None],
        T,
        t[:, None] // (T // KG),
        KG,
        K_SYM_HI,
        K_SYM_LO,
        K_HAS_HI,
        K_TABLE_HI,
        K_TABLE_LO,
        m2,
    )
    kb = _dequant(
        kc_hi,
        ks_hi,
        kz_hi,
        kn_hi,
        kbits_hi,
        kunits_hi,
        kc_lo,
        ks_lo,
        kz_lo,
        kn_lo,
        kbits_lo,
        kunits_lo,
        kt_hi,
        kt_lo,
        slot_b[None, :],
        sbh,
        t[:, None],
        T,
        t[:, None] // (T // KG),
        KG,
        K_SYM_HI,
        K_SYM_LO,
        K_HAS_HI,
        K_TABLE_HI,
        K_TABLE_LO,
        m2,
    )
    if ROTATE:
        base = (s * B + b) * D
        bca = tl.load(bcos + base + ca)[None, :]
        bsa = tl.load(bsin + base + ca)[None, :]
        bcb = tl.load(bcos + base + cb)[None, :]
        bsb = tl.load(bsin + base + cb)[None, :]
        oca = tl.load(ocos + ca[None, :] * T + t[:, None], mask=m2, other=0.0)
        osa = tl.load(osin + ca[None, :] * T + t[:, None], mask=m2, other=0.0)
        ocb = tl.load(ocos + cb[None, :] * T + t[:, None], mask=m2, other=0.0)
        osb = tl.load(osin + cb[None, :] * T + t[:, None], mask=m2, other=0.0)
        cos_a = bca * oca - bsa * osa
        sin_a = bsa * oca + bca * osa
        cos_b = bcb * ocb - bsb * osb
        sin_b = bsb * ocb + bcb * osb
        ra = ka * cos_a - kb * sin_a
        rb = kb * cos_b + ka * sin_b
        ka = ra
        kb = rb
    q_base = q_ptr + bh * R * D
    qa = tl.load(q_base + r[:, None] * D + ca[None, :], mask=r_ok[:, None], other=0.0)
    qb = tl.load(q_base + r[:, None] * D + cb[None, :], mask=r_ok[:, None], other=0.0)
    scores = tl.dot(qa, tl.trans(ka), input_precision="ieee") + tl.dot(qb, tl.trans(kb), input_precision="ieee")
    scores = tl.where(vis[None, :], scores, float("-inf"))
    m = tl.max(scores, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp(scores - m_safe[:, None])
    p = tl.where(vis[None, :], p, 0.0)
    norm = tl.sum(p, axis=1)

    # values as a [T_PAD, D] tile: unit d // U, element t * U + d % U of its row
    d = tl.arange(0, D)
    unit = d // U
    vslot = tl.load(vslot_ptr + sbh * (D // U) + unit).to(tl.int32) if V_SPLIT else unit + vunits_hi
    v = _dequant(
        vc_hi,
        vs_hi,
        vz_hi,
        vn_hi,
        vbits_hi,
        vunits_hi,
        vc_lo,
        vs_lo,
        vz_lo,
        vn_lo,
        vbits_lo,
        vunits_lo,
        vt_hi,
        vt_lo,
        vslot[None, :],
        sbh,
        t[:, None] * U + (d % U)[None, :],
        T * U,
        t[:, None],
        T,
        V_SYM_HI,
        V_SYM_LO,
        V_HAS_HI,
        V_TABLE_HI,
        V_TABLE_LO,
        m2,
    )
    v = tl.where(m2, v, 0.0)
    acc = tl.dot(p, v, input_precision="ieee")  # [R_PAD, D]
    out = (sbh * R + r) * D
    tl.store(acc_ptr + out[:, None] + d[None, :], acc, mask=r_ok[:, None])
    tl.store(m_ptr + sbh * R + r, m, mask=r_ok)
    tl.store(l_ptr + sbh * R + r, norm, mask=r_ok)


def _part(tensors: list[torch.Tensor], meta: list[int], device: torch.device) -> list[Any]:
    """``codes, scale, zero, nbytes, bits, units`` of one part (dummies when absent)."""
    codes, scale, zero = tensors
    dummy = torch.zeros(1, dtype=torch.uint8, device=device)
    if codes.numel() == 0:
        return [dummy, dummy.half(), dummy.half(), 0, 2, 0]
    bits, units = meta
    return [codes, scale, zero if zero.numel() else scale, codes.numel(), bits, units]


def decode_history(layer: Any, q: torch.Tensor, visible: torch.Tensor, state: OnlineSoftmax) -> None:
    """Fold attention of grouped queries ``q`` ([B, Hkv, R, D] fp32) over every packed block of ``layer``
    (tokens where ``visible`` [B, L]) into ``state``."""
    b, h, r, d = q.shape
    device = q.device
    groups, metas = group_args(layer)
    for tensors, meta in zip(groups, metas, strict=True):
        s, t, start = meta[0], meta[1], meta[2]
        k_hi = _part(tensors[0:3], meta[3:5], device)
        k_lo = _part(tensors[3:6], meta[5:7], device)
        v_hi = _part(tensors[7:10], meta[7:9], device)
        v_lo = _part(tensors[10:13], meta[9:11], device)
        k_slot, v_slot = tensors[6], tensors[13]
        tables = [table.to(device) if table.numel() else q for table in tensors[14:18]]
        rotate = len(tensors) >= 22  # after the stores (0-13) and their level tables (14-17)
        rope = tensors[18:22] if rotate else [q, q, q, q]
        acc = torch.empty(s, b, h, r, d, device=device)
        m = torch.empty(s, b, h, r, device=device)
        norm = torch.empty(s, b, h, r, device=device)
        _block_kernel[(s, b * h)](
            q.contiguous(), visible.to(torch.uint8).contiguous(), visible.shape[1],
            *k_hi, *k_lo, k_slot if k_slot.numel() else q, *tables[:2],
            *v_hi, *v_lo, v_slot if v_slot.numel() else q, *tables[2:],
            *rope,
            acc, m, norm,
            b, h, r, t, start, meta[11], meta[12],
            D=d, HALF=d // 2, R_PAD=max(16, triton.next_power_of_2(r)), T_PAD=max(16, triton.next_power_of_2(t)),
            ROTATE=rotate, K_SPLIT=k_slot.numel() > 0, V_SPLIT=v_slot.numel() > 0,
            K_SYM_HI=tensors[2].numel() == 0, K_SYM_LO=tensors[5].numel() == 0,
            V_SYM_HI=tensors[9].numel() == 0, V_SYM_LO=tensors[12].numel() == 0,
            K_HAS_HI=meta[4] > 0, V_HAS_HI=meta[8] > 0,
            K_TABLE_HI=tensors[14].numel() > 0, K_TABLE_LO=tensors[15].numel() > 0,
            V_TABLE_HI=tensors[16].numel() > 0, V_TABLE_LO=tensors[17].numel() > 0,
        )  # fmt: skip
        top = m.amax(dim=0)
        weight = torch.exp(m - torch.where(torch.isinf(top), torch.zeros_like(top), top))
        state.merge((acc * weight.unsqueeze(-1)).sum(0), top, (norm * weight).sum(0))
