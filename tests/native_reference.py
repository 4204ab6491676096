"""Pure-numpy reference of the native splice (and of payload decoding and RoPE re-rotation): the oracle
tests/test_native.py checks the C code against, an independent, readable implementation of the same
byte formats. Not part of the package. Minimal validation: inputs are assumed to come from
:mod:`repomem.native` (which validates them).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from repomem.native import HADAMARD_BLOCK

STATE_MAGIC = 0xAF143CD8
PAYLOAD_MAGIC = b"RMKVFRAG"
GROUP = 32

_TYPE_INFO = {0: (1, 4), 1: (1, 2), 30: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
              20: (32, 18)}


def row_size(t: int, n: int) -> int:
    blck, tsize = _TYPE_INFO[t]
    return n // blck * tsize


@dataclass
class NpState:
    seq_id: int
    n_stream: int
    positions: np.ndarray
    v_trans: int
    k_type: int
    v_type: int
    k: list[np.ndarray]  # per layer: uint8 [n_cells, k_row]
    v: list[np.ndarray]  # per layer: uint8 [n_cells, v_row] or, when v_trans, [n_embd_v, n_cells * el]
    v_el: int
    n_embd_v: list[int]


def parse_state(blob: bytes) -> NpState:
    b = memoryview(blob)
    magic, seq_id, n_stream = struct.unpack_from("<Iii", b, 0)
    assert magic == STATE_MAGIC
    off = 12
    n_cells = 0
    st = NpState(seq_id, n_stream, np.zeros(0, np.int32), 0, -1, -1, [], [], 0, [])
    for _ in range(n_stream):
        (cc,) = struct.unpack_from("<I", b, off)
        off += 4
        if cc == 0:
            continue
        n_cells = cc
        meta = np.frombuffer(b, dtype=np.int32, count=3 * cc, offset=off).reshape(cc, 3)
        st.positions = meta[:, 0].copy()
        off += 12 * cc
        st.v_trans, n_layer = struct.unpack_from("<II", b, off)
        off += 8
        for _l in range(n_layer):
            kt, krow = struct.unpack_from("<iQ", b, off)
            off += 12
            st.k_type = kt
            st.k.append(np.frombuffer(b, np.uint8, count=krow * cc, offset=off).reshape(cc, krow))
            off += krow * cc
        for _l in range(n_layer):
            if not st.v_trans:
                vt, vrow = struct.unpack_from("<iQ", b, off)
                off += 12
                st.v.append(np.frombuffer(b, np.uint8, count=vrow * cc, offset=off).reshape(cc, vrow))
                st.n_embd_v.append(vrow // _TYPE_INFO[vt][1] * _TYPE_INFO[vt][0])
                off += vrow * cc
            else:
                vt, el, ne = struct.unpack_from("<iII", b, off)
                off += 12
                st.v_el = el
                st.v.append(np.frombuffer(b, np.uint8, count=el * ne * cc, offset=off).reshape(ne, cc * el))
                st.n_embd_v.append(ne)
                off += el * ne * cc
            st.v_type = vt
    assert off == len(b)
    del n_cells
    return st


@dataclass
class NpPayload:
    n_layer: int
    n_cells: int
    k_type: int
    v_type: int
    encoding: int
    positions: np.ndarray
    n_embd_k: list[int]
    n_embd_v: list[int]
    k: list[np.ndarray]  # per layer, decoded: uint8 [n_cells, row] (f16 rows, or raw rows)
    v: list[np.ndarray]


def _dequant_q8(raw: np.ndarray, n: int, e: int) -> np.ndarray:
    nb = (e + GROUP - 1) // GROUP
    blk = raw.reshape(n, nb, 34)
    d = blk[:, :, :2].copy().view(np.float16).astype(np.float32)  # [n, nb, 1]
    q = blk[:, :, 2:].view(np.int8).astype(np.float32)  # [n, nb, 32]
    return (d * q).reshape(n, nb * GROUP)[:, :e]


def _unpack(codes: np.ndarray, bits: int, count: int = GROUP) -> np.ndarray:
    """[..., nbytes] bytes -> [..., count] codes (code k at bit k * bits, little-end first; may straddle bytes)."""
    flat = np.unpackbits(codes, axis=-1, bitorder="little")[..., :count * bits]
    flat = flat.reshape(*codes.shape[:-1], count, bits).astype(np.uint32)
    return (flat << np.arange(bits, dtype=np.uint32)).sum(axis=-1)


def _dequant_kivi_v(raw: np.ndarray, n: int, e: int, bits: int) -> np.ndarray:
    nb = (e + GROUP - 1) // GROUP
    blk = raw.reshape(n, nb, 4 + GROUP * bits // 8)
    s = blk[:, :, 0:2].copy().view(np.float16).astype(np.float32)
    m = blk[:, :, 2:4].copy().view(np.float16).astype(np.float32)
    q = _unpack(blk[:, :, 4:], bits).astype(np.float32)
    return (m + s * q).reshape(n, nb * GROUP)[:, :e]


def _dequant_kivi_k(raw: np.ndarray, n: int, e: int, bits: int, tight: bool = False) -> np.ndarray:
    """Keys per channel over groups of 32 cells; ``tight`` (k3v3): the last partial group has only its codes."""
    full, rem = divmod(n, GROUP)
    blk_bytes = 4 + GROUP * bits // 8
    if tight and rem:
        head = _dequant_kivi_k(raw[:full * e * blk_bytes], full * GROUP, e, bits) if full else np.zeros((0, e))
        last = raw[full * e * blk_bytes:].reshape(e, 4 + (rem * bits + 7) // 8)
        pad = np.zeros((e, blk_bytes), dtype=np.uint8)
        pad[:, :last.shape[1]] = last
        tail = _dequant_kivi_k(pad.reshape(-1), rem, e, bits)
        return np.concatenate([head, tail]).astype(np.float32)
    ng = (n + GROUP - 1) // GROUP
    blk = raw.reshape(ng, e, blk_bytes)
    s = blk[:, :, 0:2].copy().view(np.float16).astype(np.float32)
    m = blk[:, :, 2:4].copy().view(np.float16).astype(np.float32)
    q = _unpack(blk[:, :, 4:], bits).astype(np.float32)  # [ng, e, 32]
    x = m + s * q  # [ng, e, 32]
    return x.transpose(0, 2, 1).reshape(ng * GROUP, e)[:n]


_BITS = {3: 4, 4: 2, 5: 3}  # code bits of the KIVI keys (and q4/q2 values) per encoding id
NF_GROUP = HADAMARD_BLOCK
NF3_LEVELS = np.array([-2.1520, -1.3439, -0.7560, -0.2451, 0.2451, 0.7560, 1.3439, 2.1520], dtype=np.float32)


def _fwht(x: np.ndarray) -> np.ndarray:
    """Normalized Walsh-Hadamard transform over the last axis (64), butterflies in the C code's order."""
    lead, d = x.shape[:-1], x.shape[-1]
    h = 1
    while h < d:
        y = x.reshape(*lead, d // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = np.stack([a + b, a - b], axis=-2).reshape(*lead, d)
        h *= 2
    return x * np.float32(0.125)


def _dequant_nf3_v(raw: np.ndarray, n: int, e: int) -> np.ndarray:
    """K3V3 values: per cell, 64-channel blocks of (f16 mean, f16 std, 64 x 3-bit normal-float codes), rotated
    back by the (self-inverse) normalized Walsh-Hadamard transform."""
    nb = e // NF_GROUP
    blk = raw.reshape(n, nb, 4 + NF_GROUP * 3 // 8)
    mu = blk[:, :, 0:2].copy().view(np.float16).astype(np.float32)
    sd = blk[:, :, 2:4].copy().view(np.float16).astype(np.float32)
    q = _unpack(np.ascontiguousarray(blk[:, :, 4:]), 3, NF_GROUP)
    x = mu + sd * NF3_LEVELS[q]
    return _fwht(x.astype(np.float32)).reshape(n, e)


def _scale_table(base: np.ndarray) -> np.ndarray:
    """K4V3 scale codes on an f16 base: base * (16 + c % 16) * 2^(c // 16 - 4), in float32 like the C code."""
    c = np.arange(256)
    factor = np.ldexp((16 + c % 16).astype(np.float32), c // 16 - 4).astype(np.float32)
    return base.astype(np.float32) * factor


def _k4v3_base(raw: np.ndarray) -> np.ndarray:
    return raw[:2].copy().view(np.float16).astype(np.float32)


def _dequant_k4_k(raw: np.ndarray, n: int, e: int) -> np.ndarray:
    """K4V3 keys: f16 base, n_embd f16 channel centers, then per group of 32 cells and channel (u8 scale code,
    i8 zero point, 4-bit codes; the last partial group tight): x = center + s (q + z)."""
    tab = _scale_table(_k4v3_base(raw))
    center = raw[2:2 + 2 * e].copy().view(np.float16).astype(np.float32)
    body = raw[2 + 2 * e:]
    out = np.empty((n, e), dtype=np.float32)
    off = 0
    for i0 in range(0, n, GROUP):
        cnt = min(GROUP, n - i0)
        kb = 2 + (cnt * 4 + 7) // 8
        blk = body[off:off + e * kb].reshape(e, kb)
        off += e * kb
        s = tab[blk[:, 0]][:, None]
        z = blk[:, 1].view(np.int8).astype(np.int32)[:, None]
        q = _unpack(np.ascontiguousarray(blk[:, 2:]), 4, cnt).astype(np.int32)
        out[i0:i0 + cnt] = (center[:, None] + s * (q + z).astype(np.float32)).T
    return out


def _dequant_nf3c_v(raw: np.ndarray, n: int, e: int) -> np.ndarray:
    """K4V3 values: f16 base, then per cell and 64-channel block (u8 std code, i8 mean in std/32, 3-bit
    normal-float codes), rotated back."""
    tab = _scale_table(_k4v3_base(raw))
    nb = e // NF_GROUP
    blk = raw[2:].reshape(n, nb, 2 + NF_GROUP * 3 // 8)
    sd = tab[blk[:, :, 0]][:, :, None]
    mu = sd * blk[:, :, 1].view(np.int8).astype(np.float32)[:, :, None] * np.float32(0.03125)
    q = _unpack(np.ascontiguousarray(blk[:, :, 2:]), 3, NF_GROUP)
    x = mu + sd * NF3_LEVELS[q]
    return _fwht(x.astype(np.float32)).reshape(n, e)


def decode_block(raw: np.ndarray, enc: int, n: int, e: int, is_v: bool, t: int) -> np.ndarray:
    """Decode one layer's K or V block to uint8 rows (f16 for encodings, the cache type for raw)."""
    if enc in (0, 1):
        rs = row_size(t, e) if enc == 0 else 2 * e
        return raw.reshape(n, rs)
    if enc == 2:
        f = _dequant_q8(raw, n, e)
    elif enc == 5 and is_v:
        f = _dequant_nf3_v(raw, n, e)
    elif enc == 6:
        f = _dequant_nf3c_v(raw, n, e) if is_v else _dequant_k4_k(raw, n, e)
    else:
        bits = _BITS[enc]
        f = _dequant_kivi_v(raw, n, e, bits) if is_v else _dequant_kivi_k(raw, n, e, bits, tight=enc == 5)
    return np.ascontiguousarray(f.astype(np.float16)).view(np.uint8).reshape(n, 2 * e)


def _enc_bytes(enc: int, t: int, n: int, e: int, is_v: bool) -> int:
    if enc == 0:
        return n * row_size(t, e)
    if enc == 1:
        return n * 2 * e
    nb = (e + GROUP - 1) // GROUP
    if enc == 2:
        return n * nb * 34
    if enc == 5 and is_v:
        return n * (e // NF_GROUP) * (4 + NF_GROUP * 3 // 8)
    if enc == 6 and is_v:
        return 2 + n * (e // NF_GROUP) * (2 + NF_GROUP * 3 // 8)
    if enc == 6:
        full, rem = divmod(n, GROUP)
        return 2 + 2 * e + full * e * (2 + GROUP // 2) + (e * (2 + (rem * 4 + 7) // 8) if rem else 0)
    bits = _BITS[enc]
    blk = 4 + GROUP * bits // 8
    if is_v:
        return n * nb * blk
    if enc == 5 and n % GROUP:
        return n // GROUP * e * blk + e * (4 + (n % GROUP * bits + 7) // 8)
    return (n + GROUP - 1) // GROUP * e * blk


def parse_payload(buf: bytes | memoryview) -> NpPayload:
    b = memoryview(buf)
    assert bytes(b[:8]) == PAYLOAD_MAGIC
    header_bytes, = struct.unpack_from("<I", b, 12)
    n_layer, n_cells, k_type, v_type, enc = struct.unpack_from("<IIiiI", b, 48)
    table = np.frombuffer(b, np.uint32, count=2 * n_layer, offset=128).reshape(n_layer, 2)
    positions = np.frombuffer(b, np.int32, count=n_cells, offset=header_bytes)
    off = header_bytes + (n_cells * 4 + 7) // 8 * 8
    ks, vs = [], []
    for il in range(n_layer):
        ek, ev = int(table[il, 0]), int(table[il, 1])
        kb = _enc_bytes(enc, k_type, n_cells, ek, False)
        ks.append(decode_block(np.frombuffer(b, np.uint8, count=kb, offset=off), enc, n_cells, ek, False, k_type))
        off += kb
        vb = _enc_bytes(enc, v_type, n_cells, ev, True)
        vs.append(decode_block(np.frombuffer(b, np.uint8, count=vb, offset=off), enc, n_cells, ev, True, v_type))
        off += vb
    return NpPayload(n_layer, n_cells, k_type, v_type, enc, positions, [int(x) for x in table[:, 0]],
                     [int(x) for x in table[:, 1]], ks, vs)


def rope_table(delta: int, rope_dims: int, base: float, freq_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin per rotated pair, with ggml's float32 arithmetic (theta *= theta_scale, step by step)."""
    # powf is correctly rounded in glibc; numpy's float32 power is not always (1 ulp off for base 1e4), and
    # an ulp in theta_scale is ~1e-2 rad at position 3e4: compute in float64 and round once
    theta_scale = np.float32(float(np.float32(base)) ** float(np.float32(-2.0) / np.float32(rope_dims)))
    steps = np.full(rope_dims // 2, theta_scale, dtype=np.float32)
    steps[0] = np.float32(delta)
    theta = np.cumprod(steps, dtype=np.float32) * np.float32(freq_scale)
    return np.cos(theta.astype(np.float64)).astype(np.float32), np.sin(theta.astype(np.float64)).astype(np.float32)


def rope_shift(k: np.ndarray, delta: int, head_dim: int, rope_dims: int, base: float, neox: bool,
               freq_scale: float = 1.0, scale: float = 1.0) -> np.ndarray:
    """Rotate f16 key rows [n, n_embd] by delta positions (numpy, float32 math); returns f16."""
    n, e = k.shape
    x = k.astype(np.float32).reshape(n, e // head_dim, head_dim)
    c, s = rope_table(delta, rope_dims, base, freq_scale)
    if neox:
        half = rope_dims // 2
        x0 = x[..., :half].copy()
        x1 = x[..., half:rope_dims].copy()
        x[..., :half] = x0 * c - x1 * s
        x[..., half:rope_dims] = x0 * s + x1 * c
    else:
        x0 = x[..., 0:rope_dims:2].copy()
        x1 = x[..., 1:rope_dims:2].copy()
        x[..., 0:rope_dims:2] = x0 * c - x1 * s
        x[..., 1:rope_dims:2] = x0 * s + x1 * c
    if scale != 1.0:
        x *= np.float32(scale)
    return x.reshape(n, e).astype(np.float16)


def splice(
    prefix_blob: bytes | None,
    payloads: Sequence[bytes | memoryview],
    *,
    mode: str = "parallel",
    start_pos: int | None = None,
    key_scale: float | Sequence[float] = 1.0,
    drop_first: int = 0,
    rope_base: float = 10000.0,
    rope_dims: int = 0,
    head_dim: int | None = None,
    rope_neox: bool = False,
    v_trans: bool | None = None,
    seq_id: int = 0,
) -> tuple[bytes, int]:
    """numpy version of :func:`repomem.native.splice` (same output bytes; f16 rounding of RoPE may differ by
    one f16 ulp because numpy's float32 cos/sin are not libm's)."""
    pre = parse_state(prefix_blob) if prefix_blob is not None else None
    pls = [parse_payload(p) for p in payloads]
    scales = [float(key_scale)] * len(pls) if isinstance(key_scale, int | float) else [float(x) for x in key_scale]
    hd = head_dim or rope_dims
    n_stream = pre.n_stream if pre else 1
    have_pre = pre is not None and len(pre.positions) > 0
    vt = int(pre.v_trans) if have_pre else int(bool(v_trans))
    n_layer = len(pre.k) if have_pre else (pls[0].n_layer if pls else 0)
    k_type = pre.k_type if have_pre else (pls[0].k_type if pls and pls[0].encoding == 0 else 1)
    v_type = pre.v_type if have_pre else (pls[0].v_type if pls and pls[0].encoding == 0 else 1)

    pos_parts = [pre.positions] if have_pre else []
    pmax = int(pre.positions.max()) if have_pre else -1
    cursor = (start_pos if start_pos is not None and start_pos >= 0 else pmax + 1)
    deltas = []
    for p in pls:
        kept = p.positions[drop_first:]
        d = 0
        if len(kept) and mode == "sequential":
            d = cursor - int(kept[0])
        deltas.append(d)
        if len(kept):
            pos_parts.append(kept + d)
            pmax = max(pmax, int(kept.max()) + d)
            cursor = int(kept.max()) + d + 1
    positions = np.concatenate(pos_parts) if pos_parts else np.zeros(0, np.int32)
    n = len(positions)

    out = [struct.pack("<Iii", STATE_MAGIC, seq_id, n_stream)]
    if n == 0:
        out.append(b"\0\0\0\0" * n_stream)
        return b"".join(out), pmax + 1
    out.append(struct.pack("<I", n))
    meta = np.empty((n, 3), np.int32)
    meta[:, 0] = positions
    meta[:, 1] = 1
    meta[:, 2] = seq_id
    out.append(meta.tobytes())
    out.append(struct.pack("<II", vt, n_layer))
    for il in range(n_layer):
        parts = [pre.k[il]] if have_pre else []
        for p, d, s in zip(pls, deltas, scales, strict=True):
            rows = p.k[il][drop_first:]
            if len(rows) and ((mode == "sequential" and d != 0) or s != 1.0):
                k16 = rows.view(np.float16)
                if mode == "sequential" and d != 0:
                    k16 = rope_shift(k16, d, hd, rope_dims, rope_base, rope_neox, scale=s)
                else:
                    k16 = (k16.astype(np.float32) * np.float32(s)).astype(np.float16)
                rows = k16.view(np.uint8)
            parts.append(rows)
        k = np.concatenate(parts, axis=0)
        out.append(struct.pack("<iQ", k_type, k.shape[1]))
        out.append(k.tobytes())
    for il in range(n_layer):
        if not vt:
            parts = [pre.v[il]] if have_pre else []
            parts += [p.v[il][drop_first:] for p in pls]
            v = np.concatenate(parts, axis=0)
            out.append(struct.pack("<iQ", v_type, v.shape[1]))
            out.append(v.tobytes())
        else:
            el = _TYPE_INFO[v_type][1]
            dt = {2: np.uint16, 4: np.uint32}[el]
            ne = pls[0].n_embd_v[il] if pls else pre.n_embd_v[il]
            cols = [pre.v[il].view(dt)] if have_pre else []  # [ne, n_pre]
            cols += [p.v[il][drop_first:].view(dt).T for p in pls]  # [ne, n_frag]
            v = np.concatenate(cols, axis=1)
            out.append(struct.pack("<iII", v_type, el, ne))
            out.append(np.ascontiguousarray(v).tobytes())
    return b"".join(out), pmax + 1
