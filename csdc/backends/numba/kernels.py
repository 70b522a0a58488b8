"""Numba kernels of the event-driven simulator.

Every kernel works on a chunk of the batch, one sample after the other, and releases the
GIL (``nogil``): the backend runs whole chunks through the network in parallel threads
(coarse-grained, so a core taken by another process slows one chunk instead of stalling
every kernel at a barrier). Outputs are preallocated arrays owned by the caller (most
kernels write every element, so the caller need not zero them); synapse kernels return
their ACs / MACs, the spiking ones their spike totals, instead of per-sample arrays.
Scratch buffers (accumulators, running counts) are allocated inside the kernels, once per
call; their integer type comes from an empty ``proto`` array chosen by the caller.

Layouts (``B`` = batch, ``M`` = time steps times leading rows, ``T`` = time window):

- spike tensors are ``uint8`` arrays of 0/1, ternary (signed) spike tensors ``int8`` arrays of
  -1/0/+1 (a synapse fed by them adds the fan-out weights of a +1 and subtracts those of a -1);
- currents are ``int32`` or ``int64`` (chosen by the caller from a bound on ``|I|``);
- membrane potentials are ``int32`` or ``int64`` (likewise from a bound on ``|v|``);
- a current that is constant over time (the encoded input and what is derived from it
  without spikes) has a time axis of length 1 instead of ``T``.

Synaptic work is proportional to the number of nonzero inputs: a spike at input element
``i`` adds the fan-out weights of ``i`` to the outputs it reaches (an accumulate, AC); a
nonzero current ``q`` adds ``q`` times them (a multiply-accumulate, MAC).

A kernel that treats ternary spikes differently from binary ones (the neurons, SpikeMatMul) is
written once, as a body closed over a constant ``signed``, and compiled into its two variants
(:func:`_signed_variants`): the binary variant carries no -1 handling. Dense and conv synapses
read ternary spikes split into their +1 and -1 halves (see the backend), sum pooling and
diagonal synapses take either type as it is.

All kernels are compiled with ``cache=True``: the machine code is written to numba's
cache directory (``NUMBA_CACHE_DIR``, default ``__pycache__`` next to this file) on first
use and loaded from there by later processes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import njit
from numba.core.dispatcher import Dispatcher


@njit(cache=True)
def _taps(n_in: int, n_out: int, k: int, stride: int, pad: int, dilation: int) -> np.ndarray:
    """Window geometry along one axis: ``tab[i, j]`` is the output index that input index ``i``
    reaches through kernel tap ``j`` (``o * stride - pad + j * dilation == i``, ``0 <= o < n_out``),
    or -1. Tabulated once per call so the scatter loops need no divisions."""
    tab = np.full((n_in, k), -1, dtype=np.int64)
    for i in range(n_in):
        for j in range(k):
            num = i + pad - j * dilation
            if num >= 0 and num % stride == 0 and num // stride < n_out:
                tab[i, j] = num // stride
    return tab


@njit(inline="always")
def _gather_spikes(row: np.ndarray, pos: np.ndarray, neg: np.ndarray, signed: bool) -> tuple[int, int]:
    """Write the positions of the spikes of ``row`` to ``pos[:kp]`` and return ``(kp, kn)``: binary
    spikes (``signed`` false) are the nonzero entries, and ``kn`` is 0 (``neg`` is not touched);
    ternary ones write the +1 entries to ``pos`` and the -1 entries to ``neg[:kn]``.
    ``signed`` is a constant of the calling kernel, so each variant compiles to its own loop.
    Branch-free: every position is written, a count advances only on a spike."""
    kp = 0
    kn = 0
    for i in range(row.shape[0]):
        v = row[i]
        pos[kp] = i
        if signed:
            neg[kn] = i
            kp += v > 0
            kn += v < 0
        else:
            kp += v != 0
    return kp, kn


@njit(inline="always")
def _add_rows(dst: np.ndarray, rows: np.ndarray, idx: np.ndarray, k: int) -> None:
    """``dst += sum_{j < k} rows[idx[j]]``, four rows per pass (independent adds vectorize)."""
    n = dst.shape[0]
    j = 0
    while j + 4 <= k:
        c0, c1, c2, c3 = rows[idx[j]], rows[idx[j + 1]], rows[idx[j + 2]], rows[idx[j + 3]]
        for i in range(n):
            dst[i] += (c0[i] + c1[i]) + (c2[i] + c3[i])
        j += 4
    while j < k:
        c0 = rows[idx[j]]
        for i in range(n):
            dst[i] += c0[i]
        j += 1


@njit(nogil=True, cache=True)
def dense_spikes(s: np.ndarray, w: np.ndarray, scale: int, out: np.ndarray, proto: np.ndarray) -> int:
    """Dense synapses driven by spikes: ``out[b, m, :] = scale * sum_{i: s[b, m, i] = 1} w[i, :]``.

    ``s`` (B, M, n_in) uint8; ``w`` (n_in, n_out), row ``i`` = the fan-out of input ``i``
    (stored transposed so that a spike adds one contiguous row), divided by ``scale`` (the
    largest power of two dividing every weight, so that ``w`` fits a narrower type);
    ``out`` (G, B, M, n_out / G), every element written: G > 1 when the columns of ``w`` are
    the weights of G synapse nodes fed by the same spikes (e.g. the Q, K and V projections),
    which then share the gathering of the spikes and one pass of adds; ``out[g]`` holds
    columns ``g * n .. (g + 1) * n - 1``. Returns the ACs: spikes times ``n_out``.
    The spikes of a row are gathered first (branch-free) and added eight, then four at a
    time into an accumulator row, so the accumulator is loaded and stored once per eight
    spikes; its type is ``proto``'s, int16 when the caller bounded every row's sum of |w|
    below 2^15 (twice the lanes of int32; integer adds wrap, so only the final sum needs to
    fit), and it is written to ``out`` times ``scale`` once per row.
    """
    B, M, n_in = s.shape
    n_out = w.shape[1]
    G, n = out.shape[0], out.shape[3]
    acc = np.empty(n_out, dtype=proto.dtype)
    idx = np.empty(n_in + 1, dtype=np.int64)
    n_ac = 0
    for b in range(B):
        for m in range(M):
            k, _ = _gather_spikes(s[b, m], idx, idx, False)
            n_ac += k * n_out
            acc[:] = 0
            j = 0
            while j + 8 <= k:
                w0, w1, w2, w3 = w[idx[j]], w[idx[j + 1]], w[idx[j + 2]], w[idx[j + 3]]
                w4, w5, w6, w7 = w[idx[j + 4]], w[idx[j + 5]], w[idx[j + 6]], w[idx[j + 7]]
                for o in range(n_out):
                    acc[o] += ((w0[o] + w1[o]) + (w2[o] + w3[o])) + ((w4[o] + w5[o]) + (w6[o] + w7[o]))
                j += 8
            while j + 4 <= k:
                w0, w1, w2, w3 = w[idx[j]], w[idx[j + 1]], w[idx[j + 2]], w[idx[j + 3]]
                for o in range(n_out):
                    acc[o] += (w0[o] + w1[o]) + (w2[o] + w3[o])
                j += 4
            while j < k:
                wi = w[idx[j]]
                for o in range(n_out):
                    acc[o] += wi[o]
                j += 1
            for g in range(G):
                row = out[g, b, m]
                a0 = g * n
                for o in range(n):
                    row[o] = acc[a0 + o] * scale
    return n_ac


@njit(nogil=True, cache=True)
def dense_currents(x: np.ndarray, w: np.ndarray, scale: int, out: np.ndarray) -> int:
    """Dense synapses driven by integer currents: ``out[b, m, :] = scale * sum_i x[b, m, i] * w[i, :]``.

    Same layout as :func:`dense_spikes`; ``out`` zeros. Zero inputs are skipped; returns
    the MACs: nonzero inputs times ``n_out``.
    """
    B, M, n_in = x.shape
    n_out = w.shape[1]
    n_mac = 0
    for b in range(B):
        for m in range(M):
            row = out[b, m]
            for i in range(n_in):
                q = x[b, m, i]
                if q != 0:
                    wi = w[i]
                    for o in range(n_out):
                        row[o] += q * wi[o]
                    n_mac += n_out
            if scale != 1:
                for o in range(n_out):
                    row[o] *= scale
    return n_mac


@njit(inline="always")
def _conv_reach(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``reach[y, x]``: the kernel taps through which input pixel (y, x) reaches an output."""
    H, kh = rows.shape
    W, kw = cols.shape
    reach = np.zeros((H, W), dtype=np.int64)
    for y in range(H):
        for ky in range(kh):
            if rows[y, ky] >= 0:
                for x in range(W):
                    for kx in range(kw):
                        reach[y, x] += cols[x, kx] >= 0
    return reach


@njit(inline="always")
def _write_channels_first(acc: np.ndarray, scale: int, out: np.ndarray) -> None:
    """``out[o, p] = acc[p, o] * scale``: a step's channels-last accumulators (positions x
    channels) to the channels-first output (contiguous reads, one strided write each)."""
    P, O = acc.shape
    for p in range(P):
        ap = acc[p]
        for o in range(O):
            out[o, p] = ap[o] * scale


@njit(nogil=True, cache=True)
def conv_spikes(s: np.ndarray, w: np.ndarray, scale: int, stride: np.ndarray, pad: np.ndarray, dilation: np.ndarray,
                out: np.ndarray, proto: np.ndarray) -> int:
    """Grouped 2-D cross-correlation driven by spikes, by scattering each spike's kernel.

    ``s`` (B, M, C, H, W) uint8; ``w`` (C, kh, kw, og) with ``w[c, ky, kx, j]`` the weight
    from input channel ``c`` to output channel ``(c // cg) * og + j`` (``cg`` = C / groups),
    divided by ``scale`` (a power of two dividing every weight);
    ``stride`` (sh, sw), ``pad`` (top, left), ``dilation`` (dh, dw); ``out`` (B, M, O, OH, OW),
    every element written. Input row ``y`` reaches output row ``oy`` through kernel row ``ky``
    when ``oy * sh - top + ky * dh == y`` with ``0 <= oy < OH`` (likewise for columns); the
    returned ACs count only the targets a spike actually reaches (border-aware).
    The spiking channels of one pixel and group are gathered first and their kernels added
    four at a time to each reached output pixel (one load / store of the target per four),
    accumulated channels-last in (OH, OW, O) of ``proto``'s type (int16 when the caller
    bounded the sums, see :func:`dense_spikes`) and written to ``out`` times ``scale`` once
    per step.
    """
    B, M, C, H, W = s.shape
    _, kh, kw, og = w.shape
    O, OH, OW = out.shape[2], out.shape[3], out.shape[4]
    G = O // og
    cg = C // G
    rows = _taps(H, OH, kh, stride[0], pad[0], dilation[0])
    cols = _taps(W, OW, kw, stride[1], pad[1], dilation[1])
    reach = _conv_reach(rows, cols)
    # Accumulate channels-last so that one (ky, kx) tap adds og contiguous weights.
    acc = np.empty((OH, OW, O), dtype=proto.dtype)
    idx = np.empty(cg + 1, dtype=np.int64)
    n_ac = 0
    for b in range(B):
        for m in range(M):
            acc[:] = 0
            sbm = s[b, m]
            for y in range(H):
                for x in range(W):
                    for g in range(G):
                        o0 = g * og
                        k = 0
                        for c in range(g * cg, (g + 1) * cg):
                            idx[k] = c
                            k += sbm[c, y, x] != 0
                        if k == 0:
                            continue
                        n_ac += k * reach[y, x] * og
                        for ky in range(kh):
                            oy = rows[y, ky]
                            if oy < 0:
                                continue
                            for kx in range(kw):
                                ox = cols[x, kx]
                                if ox < 0:
                                    continue
                                tgt = acc[oy, ox, o0:o0 + og]  # a view: plain j indexing vectorizes
                                j = 0
                                while j + 4 <= k:
                                    w0, w1 = w[idx[j], ky, kx], w[idx[j + 1], ky, kx]
                                    w2, w3 = w[idx[j + 2], ky, kx], w[idx[j + 3], ky, kx]
                                    for jj in range(og):
                                        tgt[jj] += (w0[jj] + w1[jj]) + (w2[jj] + w3[jj])
                                    j += 4
                                while j < k:
                                    wk = w[idx[j], ky, kx]
                                    for jj in range(og):
                                        tgt[jj] += wk[jj]
                                    j += 1
            _write_channels_first(acc.reshape(OH * OW, O), scale, out[b, m].reshape(O, OH * OW))
    return n_ac


@njit(nogil=True, cache=True)
def conv_spikes_rows(s: np.ndarray, w: np.ndarray, scale: int, stride: np.ndarray, pad: np.ndarray,
                     dilation: np.ndarray, kw: int, out: np.ndarray, proto: np.ndarray) -> int:
    """:func:`conv_spikes` for one group (``groups == 1``) with column stride and dilation 1,
    adding a whole kernel row per spike: the outputs that input column ``x`` reaches are the
    contiguous columns ``x + left - kx`` (``kx = kw-1 .. 0``), so with channels-last
    accumulators (OH, OW x O) and ``w`` (C, kh, kw x O) holding each kernel row with its taps
    reversed (``w[c, ky, (kw-1-kx) * O + o]`` = the weight of tap (ky, kx) to output ``o``),
    one spike adds up to ``kw x O`` contiguous weights per kernel row (clipped at the
    borders) instead of ``kw`` separate runs of ``O``. ``proto``: an empty array of the
    accumulator type; same arguments, results and ACs as :func:`conv_spikes` otherwise.
    """
    B, M, C, H, W = s.shape
    O, OH, OW = out.shape[2], out.shape[3], out.shape[4]
    kh = w.shape[1]
    rows = _taps(H, OH, kh, stride[0], pad[0], dilation[0])
    cols = _taps(W, OW, kw, 1, pad[1], 1)
    reach = _conv_reach(rows, cols)
    left = pad[1]
    lo_x = np.empty(W, dtype=np.int64)  # first reached accumulator element of input column x
    len_x = np.empty(W, dtype=np.int64)  # reached elements (O per reached column)
    off_x = np.empty(W, dtype=np.int64)  # offset of the first reached tap in a kernel row
    for x in range(W):
        first = x + left - (kw - 1)  # output column of the last tap
        lo = max(first, 0)
        hi = min(x + left + 1, OW)
        lo_x[x] = lo * O
        len_x[x] = max(hi - lo, 0) * O
        off_x[x] = (lo - first) * O
    acc = np.empty((OH, OW * O), dtype=proto.dtype)
    idx = np.empty(C + 1, dtype=np.int64)
    n_ac = 0
    for b in range(B):
        for m in range(M):
            acc[:] = 0
            sbm = s[b, m]
            for y in range(H):
                for x in range(W):
                    L = len_x[x]
                    if L == 0:
                        continue
                    k = 0
                    for c in range(C):
                        idx[k] = c
                        k += sbm[c, y, x] != 0
                    if k == 0:
                        continue
                    n_ac += k * reach[y, x] * O
                    t0 = lo_x[x]
                    w_0 = off_x[x]
                    for ky in range(kh):
                        oy = rows[y, ky]
                        if oy < 0:
                            continue
                        tgt = acc[oy, t0:t0 + L]  # a view: plain jj indexing vectorizes
                        j = 0
                        while j + 4 <= k:
                            w0 = w[idx[j], ky, w_0:w_0 + L]
                            w1 = w[idx[j + 1], ky, w_0:w_0 + L]
                            w2 = w[idx[j + 2], ky, w_0:w_0 + L]
                            w3 = w[idx[j + 3], ky, w_0:w_0 + L]
                            for jj in range(L):
                                tgt[jj] += (w0[jj] + w1[jj]) + (w2[jj] + w3[jj])
                            j += 4
                        while j < k:
                            wk = w[idx[j], ky, w_0:w_0 + L]
                            for jj in range(L):
                                tgt[jj] += wk[jj]
                            j += 1
            _write_channels_first(acc.reshape(OH * OW, O), scale, out[b, m].reshape(O, OH * OW))
    return n_ac


@njit(nogil=True, cache=True)
def conv_currents(x: np.ndarray, w: np.ndarray, scale: int, stride: np.ndarray, pad: np.ndarray,
                  dilation: np.ndarray, out: np.ndarray) -> int:
    """Grouped 2-D cross-correlation driven by integer currents (see :func:`conv_spikes`):
    each nonzero input ``q`` scatters ``q`` times its kernel; ``out`` every element written.
    Returns the MACs: the (input, reached target) pairs of nonzero inputs."""
    B, M, C, H, W = x.shape
    _, kh, kw, og = w.shape
    O, OH, OW = out.shape[2], out.shape[3], out.shape[4]
    cg = C // (O // og)
    rows = _taps(H, OH, kh, stride[0], pad[0], dilation[0])
    cols = _taps(W, OW, kw, stride[1], pad[1], dilation[1])
    acc = np.zeros((OH, OW, O), dtype=out.dtype)
    n_mac = 0
    for b in range(B):
        for m in range(M):
            acc[:] = 0
            for c in range(C):
                o0 = (c // cg) * og
                for y in range(H):
                    for xx in range(W):
                        q = x[b, m, c, y, xx]
                        if q == 0:
                            continue
                        for ky in range(kh):
                            oy = rows[y, ky]
                            if oy < 0:
                                continue
                            for kx in range(kw):
                                ox = cols[xx, kx]
                                if ox < 0:
                                    continue
                                tgt = acc[oy, ox, o0:o0 + og]  # a view: plain j indexing vectorizes
                                wk = w[c, ky, kx]
                                for j in range(og):
                                    tgt[j] += q * wk[j]
                                n_mac += og
            _write_channels_first(acc.reshape(OH * OW, O), scale, out[b, m].reshape(O, OH * OW))
    return n_mac


@njit(nogil=True, cache=True)
def sum_pool(s: np.ndarray, kernel: np.ndarray, stride: np.ndarray, pad: np.ndarray, out: np.ndarray) -> None:
    """Sum pooling of spikes: each spike adds its value (1, or -1 for a ternary spike) to every
    window that contains it.

    ``s`` (B, T, C, H, W) uint8 or int8 (ternary); ``kernel`` (kh, kw); ``stride`` (sh, sw); ``pad`` (top, left);
    ``out`` (B, T, C, OH, OW) zeros. Windows are placed as in :func:`conv_spikes` (dilation 1).
    """
    B, T, C, H, W = s.shape
    OH, OW = out.shape[3], out.shape[4]
    kh, kw = kernel[0], kernel[1]
    rows = _taps(H, OH, kh, stride[0], pad[0], 1)
    cols = _taps(W, OW, kw, stride[1], pad[1], 1)
    for b in range(B):
        for t in range(T):
            for c in range(C):
                for y in range(H):
                    for x in range(W):
                        sv = s[b, t, c, y, x]
                        if sv == 0:
                            continue
                        for ky in range(kh):
                            oy = rows[y, ky]
                            if oy < 0:
                                continue
                            for kx in range(kw):
                                ox = cols[x, kx]
                                if ox >= 0:
                                    out[b, t, c, oy, ox] += sv


@njit(nogil=True, cache=True)
def spike_max_pool(s: np.ndarray, kernel: np.ndarray, stride: np.ndarray, pad: np.ndarray, out: np.ndarray,
                   counts: np.ndarray) -> int:
    """Max pooling by temporal decomposition: ``y(t) = max_win C(t) - max_win C(t-1)``.

    ``s`` (B, T, C, H, W) uint8 spikes with running counts ``C``; ``out`` (B, T, C, OH, OW),
    every element written; ``counts`` (B, C, OH, OW) receives the output spike counts
    (``max_win C(T)``); returns their sum. Window ``(oy, ox)`` covers input rows
    ``oy * sh - top .. + kh - 1`` and columns ``ox * sw - left .. + kw - 1``; padding has
    count 0 and never exceeds a maximum, which starts at 0.
    Per step the running counts are updated (kept flat in a zero-bordered array, so that
    every window reads ``kh x kw`` entries at fixed offsets from its first one, without
    bound checks) and every window's maximum is compared with the previous step's: a
    running count grows by at most 1 per step, so the difference is the (single) output
    spike. Branch-free, one flat loop over all windows of all channels (2 x 2 windows
    unrolled); without padding the running counts are updated in one flat loop too.
    """
    B, T, C, H, W = s.shape
    OH, OW = out.shape[3], out.shape[4]
    kh, kw = kernel[0], kernel[1]
    sh, sw = stride[0], stride[1]
    top, left = pad[0], pad[1]
    Hp = max(H + top, (OH - 1) * sh + kh)
    Wp = max(W + left, (OW - 1) * sw + kw)
    n_in = C * H * W
    n_out = C * OH * OW
    running = np.zeros(C * Hp * Wp, dtype=np.int32)  # input (c, y, x) at (c, y + top, x + left)
    prev = np.empty(n_out, dtype=np.int32)
    first = np.empty(n_out, dtype=np.int64)  # each window's first tap in ``running``
    for c in range(C):
        for oy in range(OH):
            for ox in range(OW):
                first[(c * OH + oy) * OW + ox] = (c * Hp + oy * sh) * Wp + ox * sw
    taps = np.empty(kh * kw, dtype=np.int64)  # offsets of the taps from the first
    for ky in range(kh):
        for kx in range(kw):
            taps[ky * kw + kx] = ky * Wp + kx
    unpadded = Hp == H and Wp == W
    total = 0
    for b in range(B):
        running[:] = 0
        prev[:] = 0
        for t in range(T):
            st = s[b, t].reshape(n_in)
            if unpadded:
                for i in range(n_in):
                    running[i] += st[i]
            else:
                for c in range(C):
                    for y in range(H):
                        r0 = (c * Hp + y + top) * Wp + left
                        s0 = (c * H + y) * W
                        for x in range(W):
                            running[r0 + x] += st[s0 + x]
            ot = out[b, t].reshape(n_out)
            if kh == 2 and kw == 2:
                for o in range(n_out):
                    f = first[o]
                    mx = max(max(running[f], running[f + 1]), max(running[f + Wp], running[f + Wp + 1]))
                    ot[o] = mx > prev[o]
                    prev[o] = mx
            else:
                for o in range(n_out):
                    f = first[o]
                    mx = np.int32(0)
                    for j in range(kh * kw):
                        mx = max(mx, running[f + taps[j]])
                    ot[o] = mx > prev[o]
                    prev[o] = mx
        cb = counts[b].reshape(n_out)
        for o in range(n_out):
            cb[o] = prev[o]
            total += prev[o]
    return total


def _signed_variants(body: Callable[[bool], Callable], name: str, signed_name: str, doc: str,
                     signed_doc: str) -> tuple[Dispatcher, Dispatcher]:
    """The kernels ``name`` (binary spikes) and ``signed_name`` (ternary spikes) compiled from one
    body: ``body(signed)`` returns the kernel function closed over the constant ``signed``, so
    numba compiles the -1 handling into the signed variant only (the binary one runs the
    binary loops, no per-spike test). Each variant has its own name, hence its own entry in
    numba's on-disk cache (:func:`kernels_cached` checks every kernel)."""
    kernels = []
    for signed, label, text in ((False, name, doc), (True, signed_name, signed_doc)):
        fn = body(signed)
        fn.__name__ = fn.__qualname__ = label
        fn.__doc__ = text
        kernels.append(njit(nogil=True, cache=True)(fn))
    return kernels[0], kernels[1]


def _spike_matmul(signed: bool) -> Callable:
    def kernel(a: np.ndarray, bm: np.ndarray, weight: int, out: np.ndarray, proto: np.ndarray) -> int:
        B, T, L, M, K = a.shape
        N = bm.shape[4]
        count_a = np.zeros((K, M), dtype=proto.dtype)  # C_A, transposed: column k of C_A is contiguous
        count_b = np.zeros((K, N), dtype=proto.dtype)  # C_B
        col = np.empty((N, M), dtype=proto.dtype)  # C_A(t-1) B(t), transposed
        rowp = np.empty((M, N), dtype=proto.dtype)  # A(t) C_B(t)
        pos = np.empty(max(K, N) + 1, dtype=np.int64)  # a row's (+1) spikes
        neg = np.empty(max(K, N) + 1 if signed else 0, dtype=np.int64)  # its -1 spikes
        n_ac = 0
        for b in range(B):
            for l in range(L):
                count_a[:] = 0
                count_b[:] = 0
                for t in range(T):
                    o = out[b, t, l]
                    bt = bm[b, t, l]
                    at = a[b, t, l]
                    # A spike B(t)[k, n] adds (a -1 subtracts) the counts C_A(t-1)[:, k] (count_a not yet
                    # updated) to column n; B(t) is read by rows (contiguous); then C_B includes step t.
                    nb = 0
                    col[:] = 0
                    for kk in range(K):
                        kp, kn = _gather_spikes(bt[kk], pos, neg, signed)
                        nb += kp + kn
                        cak = count_a[kk]
                        for j in range(kp):
                            cn = col[pos[j]]
                            for i in range(M):
                                cn[i] += cak[i]
                        for j in range(kn):  # none in the binary variant (kn is the constant 0)
                            cn = col[neg[j]]
                            for i in range(M):
                                cn[i] -= cak[i]
                    for kk in range(K):
                        cbk = count_b[kk]
                        btk = bt[kk]
                        for n in range(N):
                            cbk[n] += btk[n]
                    # A(t) spikes of row m add (a -1 subtracts) the counts C_B(t)[k, :].
                    na = 0
                    for m in range(M):
                        rm = rowp[m]
                        rm[:] = 0
                        kp, kn = _gather_spikes(at[m], pos, neg, signed)
                        na += kp + kn
                        _add_rows(rm, count_b, pos, kp)
                        for j in range(kn):
                            cb = count_b[neg[j]]
                            for n in range(N):
                                rm[n] -= cb[n]
                        for j in range(kp):
                            count_a[pos[j], m] += 1
                        for j in range(kn):
                            count_a[neg[j], m] -= 1
                    n_ac += nb * M + na * N
                    for m in range(M):
                        om = o[m]
                        rm = rowp[m]
                        for n in range(N):
                            om[n] = weight * (np.int64(rm[n]) + np.int64(col[n, m]))
        return n_ac

    return kernel


spike_matmul, spike_matmul_signed = _signed_variants(
    _spike_matmul, "spike_matmul", "spike_matmul_signed",
    """Product of two spike tensors by temporal decomposition (SPEC 2.4):
    ``out(t) = weight * (A(t) C_B(t) + C_A(t-1) B(t))`` with running counts ``C``.

    ``a`` (B, T, L, M, K) and ``bm`` (B, T, L, K, N) uint8 spikes (L = product of the
    leading axes); ``out`` (B, T, L, M, N), every element written. Event-driven: a spike
    ``B(t)[k, n]`` adds the previous counts ``C_A(t-1)[:, k]`` to column ``n`` (M targets), a
    spike ``A(t)[m, k]`` adds the counts ``C_B(t)[k, :]`` to row ``m`` (N targets); returns the
    ACs (the targets). Counts and the two partial products are kept in ``proto.dtype``
    (int16 when the caller checked ``K * T < 2^15``: then every partial sum fits, and twice
    the lanes of int32); the spikes of a row of A(t) are gathered and their count vectors
    added four at a time; those of a row k of B(t) add column k of C_A(t-1) to a transposed
    buffer (contiguous adds, added to the output once per step), and ``weight`` multiplies
    each output once.
    """,
    """:func:`spike_matmul` where either operand may be ternary (int8 -1/0/+1; the other uint8 or
    int8): ``out(t) = weight * (A(t) C_B(t) + C_A(t-1) B(t))`` with signed running counts ``C``.
    A +1 spike adds the count row / column it gates, a -1 spike subtracts it (additions and
    subtractions only). Same layouts, bounds (``|C| <= T``) and ACs (one per target of a spike
    of either sign) as :func:`spike_matmul`.
    """)


@njit(inline="always")
def _fire(v: int, n: int, threshold: np.ndarray, row: np.ndarray, cnt: np.ndarray,
          signed: bool) -> tuple[int, int, bool]:
    """A firing step of neuron ``n`` at potential ``v``: its spike ``f`` (+1 where ``v >= threshold[n]``;
    in a ternary population (``signed``) -1 where ``v < 0``; else 0) written to ``row[n]`` and added
    to ``cnt[n]``. Returns ``(v - f * threshold[n], whether it spiked, whether with -1)``."""
    up = v >= threshold[n]
    down = signed and v < 0
    f = np.int32(up) - np.int32(down)
    row[n] = f
    cnt[n] += f
    return v - f * threshold[n], up + down, down


def _neurons(signed: bool) -> Callable:
    def kernel(cur: np.ndarray, threshold: np.ndarray, v0: np.ndarray, bias: np.ndarray, delay: int,
               out: np.ndarray, counts: np.ndarray) -> tuple[int, int, int]:
        B, Tc, N = cur.shape
        T = out.shape[1]
        vt = threshold.dtype.type
        v = np.empty(N, dtype=threshold.dtype)
        cnt = np.empty(N, dtype=np.int32)  # (signed) counts, |count| <= T < 2^31: in the lanes of v when v is int32
        peak = vt(0)
        total = 0
        negative = 0
        for b in range(B):
            v[:] = v0
            cnt[:] = 0
            for n in range(N):
                peak = max(peak, abs(v[n]))
            k = 0  # spikes (the binary variant sums its counts instead, once per sample)
            kn = 0  # -1 spikes
            for u in range(1, T + 1):
                x = cur[b, u - 1 if Tc > 1 else 0]
                if u > delay:
                    # Branch-free update (vectorizes): fire where v >= threshold (ternary: or v < 0), reset by
                    # subtracting (adding) the threshold.
                    row = out[b, u - delay - 1]
                    for n in range(N):
                        vn = vt(v[n] + x[n] + bias[n])
                        reset, fired, down = _fire(vn, n, threshold, row, cnt, signed)
                        vr = vt(reset)
                        if signed:  # a -1 reset can raise |v| (up to threshold - 1); counts cannot give k
                            k += fired
                            kn += down
                            peak = max(peak, max(abs(vn), abs(vr)))
                        else:
                            peak = max(peak, abs(vn))
                        v[n] = vr
                else:
                    for n in range(N):
                        vn = vt(v[n] + x[n] + bias[n])
                        peak = max(peak, abs(vn))
                        v[n] = vn
            # Input exhausted: the remaining output steps only fire and reset.
            for u in range(max(T, delay) + 1, T + delay + 1):
                row = out[b, u - delay - 1]
                for n in range(N):
                    reset, fired, down = _fire(v[n], n, threshold, row, cnt, signed)
                    vr = vt(reset)
                    if signed:
                        k += fired
                        kn += down
                        peak = max(peak, abs(vr))
                    v[n] = vr
            cb = counts[b]
            for n in range(N):
                cb[n] = cnt[n]
                if not signed:
                    k += cnt[n]
            total += k
            negative += kn
        return total, negative, np.int64(peak)

    return kernel


dif_neurons, ternary_neurons = _signed_variants(
    _neurons, "dif_neurons", "ternary_neurons",
    """Delayed integrate-and-fire population (SPEC 2.2, Algorithm 1) with reset by subtraction.

    ``cur`` (B, Tc, N) input current, Tc = T or 1 (constant over time); ``threshold``, ``v0``,
    ``bias`` (N,) int32 or int64, the type of the membrane potential (int32 when the caller
    has bounded |v| below 2^31: twice the lanes per vector instruction); ``out`` (B, T, N)
    uint8 and ``counts`` (B, N) int64, every element written. Per neuron: ``v = v0``; for u
    in 1..T+delay: if u <= T, ``v += I(u) + bias``; if u > delay and ``v >= threshold``,
    spike at output step u - delay and ``v -= threshold``. Steps in (T, delay] do nothing
    and are skipped. Returns (spikes, 0 (the -1 spikes of :func:`ternary_neurons`), the
    largest |v| reached over v0 and every integrated value; a reset only moves v towards 0,
    so it cannot set a new maximum). Counts are kept in int32 while firing (the int64
    results are written once per sample).
    """,
    """Delayed integrate-and-fire population with signed spikes (docs/signed_spikes.md).

    Arguments as :func:`dif_neurons`, but ``out`` (B, T, N) is int8 (-1/0/+1) and ``counts``
    receives the signed counts. Per neuron: ``v = v0``; for u in 1..T+delay: if u <= T,
    ``v += I(u) + bias``; if u > delay: ``v >= threshold`` emits +1 and subtracts ``threshold``,
    ``v < 0`` emits -1 and adds ``threshold``. Returns (spikes of both signs, the -1 spikes among
    them, the largest |v| over v0, every integrated value and every value after a firing step: a
    -1 reset can raise |v| up to ``threshold - 1``).
    """)


@njit(nogil=True, cache=True)
def mbe_neurons(cur: np.ndarray, v0: np.ndarray, offset: np.ndarray, threshold: np.ndarray, reset: np.ndarray,
                weight: np.ndarray, out: np.ndarray) -> tuple[int, int]:
    """Multi-basis exponential-decay population (docs/mbe.md), integer state.

    ``cur`` (B, Tc, N) input current, Tc = T or 1 (constant over time); ``v0`` (N,), ``offset``
    (K,), ``threshold``, ``reset``, ``weight`` (K, S) int64; ``out`` (B, T, N) current, every
    element written. Per element: ``V = v0 + sum_u I(u)`` over the T input steps; per basis k,
    ``u = V + offset[k]``, then for t < S: fire where ``u >= threshold[k, t]`` (adding
    ``weight[k, t]`` to output step t) and subtract ``reset[k, t]``. Returns (spikes, the largest
    |u| over every basis's initial and reset values)."""
    B, Tc, N = cur.shape
    T = out.shape[1]
    K, S = threshold.shape
    acc = np.empty(N, dtype=np.int64)
    u = np.empty(N, dtype=np.int64)
    spikes = 0
    peak = np.int64(0)
    for b in range(B):
        for n in range(N):
            acc[n] = v0[n]
        if Tc == 1:
            x = cur[b, 0]
            for n in range(N):
                acc[n] += np.int64(T) * np.int64(x[n])
        else:
            for t in range(Tc):
                x = cur[b, t]
                for n in range(N):
                    acc[n] += x[n]
        out[b] = 0
        for k in range(K):
            for n in range(N):
                u[n] = acc[n] + offset[k]
                peak = max(peak, abs(u[n]))
            for t in range(S):
                th, r, w = threshold[k, t], reset[k, t], weight[k, t]
                row = out[b, t]
                fired = 0
                for n in range(N):
                    f = np.int64(u[n] >= th)
                    row[n] += f * w
                    u[n] -= f * r
                    fired += f
                    peak = max(peak, abs(u[n]))
                spikes += fired
    return spikes, peak


@njit(nogil=True, cache=True)
def diagonal_spikes(s: np.ndarray, w: np.ndarray, out: np.ndarray) -> int:
    """One-to-one synapses: ``out[b, t, n] = s[b, t, n] * w[n]`` for ``s`` (B, T, N) uint8 spikes
    or int8 ternary spikes; returns the ACs (one per spike of either sign)."""
    B, T, N = s.shape
    n_ac = 0
    for b in range(B):
        for t in range(T):
            st = s[b, t]
            ot = out[b, t]
            k = 0
            for n in range(N):
                ot[n] = st[n] * w[n]
                k += st[n] != 0
            n_ac += k
    return n_ac


@njit(nogil=True, cache=True)
def add_currents(a: np.ndarray, c: np.ndarray, out: np.ndarray) -> None:
    """``out = a + c`` for currents (B, Ta, N) and (B, Tc, N) with a time axis of length T or
    1 (a constant current, broadcast over time); ``out`` (B, T, N) may be ``a``."""
    B, T, N = out.shape
    for b in range(B):
        for t in range(T):
            at = a[b, t if a.shape[1] > 1 else 0]
            ct = c[b, t if c.shape[1] > 1 else 0]
            ot = out[b, t]
            for n in range(N):
                ot[n] = at[n] + ct[n]


@njit(nogil=True, cache=True)
def permute(src: np.ndarray, out: np.ndarray) -> None:
    """The copy of a Transpose: ``out[...] = src[...]`` for a strided 4-D view ``src`` (batch
    and time axes merged, padded with unit axes; never contiguous) and a C-contiguous ``out``
    of the same shape, in ``out``'s order (numpy's generic copy is slow on short rows)."""
    A, B, C, D = out.shape
    for i in range(A):
        for j in range(B):
            for k in range(C):
                s = src[i, j, k]
                o = out[i, j, k]
                for m in range(D):
                    o[m] = s[m]


KERNELS: tuple[Dispatcher, ...] = (
    dense_spikes, dense_currents, conv_spikes, conv_spikes_rows, conv_currents, sum_pool, spike_max_pool,
    spike_matmul, dif_neurons, diagonal_spikes, add_currents, permute, spike_matmul_signed, ternary_neurons, mbe_neurons,
)


def kernels_cached() -> bool:
    """Whether numba's on-disk cache already holds compiled code for every kernel.

    True means this process loads the kernels instead of compiling them (unless it needs a
    dtype specialization no earlier run used). Reads the cache index through numba's own
    cache object, which checks the numba version and the source file's timestamp.
    """
    for kernel in KERNELS:
        try:
            index = kernel._cache._cache_file._load_index()  # numba internals, stable since 0.40
        except Exception:  # noqa: BLE001 (no cache object under NUMBA_DISABLE_JIT; unreadable or corrupt index)
            return False
        if not index:
            return False
    return True
