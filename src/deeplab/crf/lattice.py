"""The permutohedral lattice (Adams, Baek & Davis 2010) in PyTorch tensor ops.

A high-dimensional Gaussian filter ``out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j`` is approximated
by splatting each value onto the d+1 vertices of the lattice simplex that encloses its feature
vector (barycentric weights), blurring the lattice with a [1/2, 1, 1/2] kernel along each of the
d+1 lattice directions, and slicing back with the same weights. The arithmetic follows
Krähenbühl's ``permutohedral.cpp`` (the code inside pydensecrf) step for step, so that the
approximation, and not only the ideal Gaussian, matches: the same elevation, rounding, rank,
barycentric weights, blur order and the ``1 / (1 + 2^-d)`` slice constant.

The build has two implementations giving the same lattice: tensor ops (a sort of the packed
keys and binary searches for the blur neighbours; no Python loop over pixels), which run on CPU
and CUDA, and on the CPU a hash-table build compiled by numba (``_cpu_lattice``), 1.5x faster.
A batch of images shares one lattice whose keys carry the image index (one hash table per image
in the compiled build), which keeps the images apart: no blur neighbour crosses between images.

The lattice is built once per image (the costly part: key dedup and the blur neighbours) and
then applied as gathers (``embedding_bag`` with per-sample weights): splat ``S`` (M x P),
blur ``B_j`` (M x M, symmetric, 3 entries a row) and slice ``S^T`` (d+1 entries a row).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from deeplab.crf import _cpu_lattice

__all__ = ["LatticeFilter", "PermutohedralLattice", "lattice_compiled"]


def lattice_compiled() -> bool:
    """Whether CPU lattices are built by the compiled (numba) code rather than tensor ops."""
    return _cpu_lattice.AVAILABLE


# Keys are packed into one int64 per lattice point; one bit is kept free for the sign.
_PACK_BITS = 62


def _elevation_scale(d: int) -> Tensor:
    """The (d,) float32 per-coordinate scale of the elevation, as permutohedral.cpp rounds it."""
    # Expected standard deviation of the filter (p.6 in Adams et al.). Rounded exactly as
    # permutohedral.cpp does (a float, then double arithmetic stored as float), so that points
    # near a simplex boundary fall on the same side as in pydensecrf.
    inv_std_dev = float(torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32))
    return torch.tensor([1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev for i in range(d)], dtype=torch.float32)


def _elevate(features: Tensor) -> Tensor:
    """Project (P, d) features onto the plane ``sum = 0`` of R^{d+1}, scaled (Adams et al., p.5)."""
    p, d = features.shape
    dev = features.device
    cf = features.to(torch.float32) * _elevation_scale(d).to(dev)
    # suffix[:, j] = cf[:, j] + ... + cf[:, d-1], summed from the end like the C++ loop.
    suffix = torch.flip(torch.cumsum(torch.flip(cf, (1,)), 1), (1,))
    elevated = torch.empty(p, d + 1, dtype=torch.float32, device=dev)
    elevated[:, 0] = suffix[:, 0]
    after = torch.cat([suffix[:, 1:], torch.zeros(p, 1, dtype=torch.float32, device=dev)], 1)
    j = torch.arange(1, d + 1, device=dev, dtype=torch.float32)
    elevated[:, 1:] = after - j * cf
    return elevated


def _simplex(elevated: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Return the 0-coloured vertex ``rem0``, the ``rank`` and the barycentric weights."""
    p, d1 = elevated.shape
    d = d1 - 1
    dev = elevated.device
    down_factor = torch.tensor(1.0 / d1, dtype=torch.float32, device=dev)
    v = elevated * down_factor
    up = torch.ceil(v).mul_(d1)
    down = v.floor_().mul_(d1)
    rem0 = torch.where((up - elevated) < (elevated - down), up, down)  # float, exact small multiples of d1
    del up, down, v
    diff = elevated - rem0
    # rank[i] = #{j: diff_j > diff_i} + #{j < i: diff_j == diff_i}: the C++ loop's tie order.
    # A loop over j on (P, d+1) tensors: a (P, d+1, d+1) comparison costs 4x more here.
    rank = torch.zeros(p, d1, dtype=torch.int64, device=dev)
    for j in range(d1):
        col = diff[:, j : j + 1]
        rank += col > diff
        if j < d:
            rank[:, j + 1 :] += col == diff[:, j + 1 :]
    del diff
    total = torch.div(rem0.sum(1).to(torch.int64), d1, rounding_mode="trunc")
    rank += total[:, None]
    # Bring the point back onto the plane (sum = 0) when the rounding left it off.
    wrap = (rank < 0).to(torch.int64) - (rank > d).to(torch.int64)
    rank += d1 * wrap
    rem0 += d1 * wrap
    del wrap
    vb = (elevated - rem0).mul_(down_factor)
    bary = torch.zeros(p, d + 2, dtype=torch.float32, device=dev)
    bary.scatter_add_(1, d - rank, vb)
    bary.scatter_add_(1, d - rank + 1, vb.neg_())
    bary[:, 0] += 1.0 + bary[:, d + 1]
    return rem0.to(torch.int64), rank, bary[:, : d + 1].contiguous()


class _Filter(torch.autograd.Function):
    """A lattice filter as an autograd op: it is linear, so its backward is its transpose."""

    @staticmethod
    def forward(ctx, op: LatticeFilter, x: Tensor, reverse: bool) -> Tensor:  # type: ignore[override]
        ctx.op = op
        ctx.reverse = reverse
        return op._run(x, reverse)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # (D_out S^T B_d ... B_0 S D_in)^T = D_in S^T B_0 ... B_d S D_out: the B_j are symmetric,
        # so the transpose is the same filter with the blur order reversed and the two diagonal
        # scalings swapped (they are equal for the symmetric normalisation).
        op = ctx.op if ctx.op.symmetric else ctx.op.transposed()
        return None, _Filter.apply(op, grad, not ctx.reverse), None


class LatticeFilter:
    """``x -> diag(slice_scale) S^T B_d ... B_0 S diag(splat_scale) x`` on a built lattice.

    The blur and the splat/slice gathers come from the lattice; the per-point scalings (the
    slice constant, a kernel normalisation) are folded into the gathers' per-sample weights, so
    they cost nothing per iteration. Differentiable with respect to ``x``.

    ``fp16``: float32 values pass through the lattice as float16 (the gathers still sum in
    float32): the splat, blur and slice move half the bytes, ~1.4x faster on a CPU, at a
    relative error of about 1e-3 in the filtered values. float64 values are never rounded.
    """

    def __init__(
        self, lattice: PermutohedralLattice, splat_scale: Tensor | None, slice_scale: Tensor | None, fp16: bool = False
    ) -> None:
        self.lattice = lattice
        self.fp16 = fp16
        self.symmetric = splat_scale is None and slice_scale is None
        if splat_scale is not None and slice_scale is not None:
            self.symmetric = bool(torch.equal(splat_scale, slice_scale))
        self._scales = (splat_scale, slice_scale)
        self._w: dict[tuple[str, torch.dtype], Tensor] = {}

    def transposed(self) -> LatticeFilter:
        """The transposed filter (the scalings swapped; run it with the blur order reversed)."""
        splat_scale, slice_scale = self._scales
        return LatticeFilter(self.lattice, slice_scale, splat_scale, self.fp16)

    def _float32_weight(self, kind: str) -> Tensor:
        """The splat, blur or slice gather weights, float32, with the scalings folded in."""
        lat = self.lattice
        splat_scale, slice_scale = self._scales
        if kind == "blur":
            return lat._blur_w
        if kind == "splat":
            w = lat._splat_bary
            return w if splat_scale is None else w * splat_scale.reshape(-1)[lat._splat_idx.long()]
        w = lat._slice_bary * lat.alpha
        return w if slice_scale is None else w * slice_scale.reshape(-1, 1)

    def _weight(self, kind: str, dtype: torch.dtype) -> Tensor:
        """``_float32_weight`` in ``dtype``, made on first use: fp16 iterations keep no float32 copy."""
        key = (kind, dtype)
        if key not in self._w:
            self._w[key] = self._float32_weight(kind).to(dtype)
        return self._w[key]

    def value_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype values of ``dtype`` pass through the lattice as (float16 for fp16 float32)."""
        return torch.float16 if self.fp16 and dtype == torch.float32 else dtype

    def splat_blur(self, x: Tensor, reverse: bool = False) -> Tensor:
        """The (M+1, C) blurred lattice values of ``x`` (P, C), already in ``value_dtype``."""
        lat = self.lattice
        splat_w, blur_w = self._weight("splat", x.dtype), self._weight("blur", x.dtype)
        v = F.embedding_bag(lat._splat_idx, x, lat._splat_off, mode="sum", per_sample_weights=splat_w)
        order = range(lat.dim, -1, -1) if reverse else range(lat.dim + 1)
        for j in order:
            v = F.embedding_bag(lat._blur_idx[j], v, lat._blur_off, mode="sum", per_sample_weights=blur_w)
        return v

    def slice_operands(self) -> tuple[Tensor, Tensor]:
        """The slice as (P, d+1) vertex indices and weights (scalings folded in; not kept)."""
        d1 = self.lattice.dim + 1
        return self.lattice._slice_idx.reshape(-1, d1), self._float32_weight("slice")

    def _run(self, x: Tensor, reverse: bool) -> Tensor:
        lat = self.lattice
        dtype = self.value_dtype(x.dtype)
        v = self.splat_blur(x.to(dtype), reverse)
        slice_w = self._weight("slice", dtype)
        out = F.embedding_bag(lat._slice_idx, v, lat._slice_off, mode="sum", per_sample_weights=slice_w.reshape(-1))
        return out.to(x.dtype)

    def __call__(self, values: Tensor, reverse: bool = False) -> Tensor:
        """Filter ``values`` of shape (P, C) with P = B*N, float32 or float64."""
        p = self.lattice.batch * self.lattice.num_points
        if values.dim() != 2 or values.shape[0] != p:
            raise ValueError(f"values {tuple(values.shape)} must be (P, C) with P = {p} lattice points")
        if values.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"values must be float32 or float64, got {values.dtype}")
        values = values.contiguous()
        if torch.is_grad_enabled() and values.requires_grad:
            return _Filter.apply(self, values, reverse)
        return self._run(values, reverse)


class PermutohedralLattice:
    """A permutohedral lattice over the features of one or more images.

    Args:
        features: ``(N, d)`` or ``(B, N, d)`` float features, already divided by the kernel's
            standard deviations (e.g. ``x / sxy, y / sxy, r / srgb, ...``). Batched inputs get one
            lattice with the image index in the keys.

    ``filter(values)`` then approximates ``sum_j exp(-|f_i - f_j|^2 / 2) values_j`` (the pixel
    itself included, as in pydensecrf) for values of shape ``(N, C)`` / ``(B, N, C)``.
    Attributes: ``num_vertices`` (M, lattice points in use), ``batch``, ``num_points``, ``dim``.
    """

    def __init__(self, features: Tensor, backend: str = "auto") -> None:
        if backend not in ("auto", "torch", "numba"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'numba', got {backend!r}")
        if features.dim() == 2:
            features = features[None]
        if features.dim() != 3 or not features.is_floating_point():
            raise ValueError(
                f"features must be float (B, N, d) or (N, d), got shape {tuple(features.shape)} {features.dtype}"
            )
        b, n, d = features.shape
        if d < 1 or n < 1 or b < 1:
            raise ValueError(f"features must have B, N >= 1 and d >= 1, got shape {tuple(features.shape)}")
        if not bool(torch.isfinite(features).all()):
            raise ValueError(f"features {tuple(features.shape)} contain NaN or infinite values")
        self.batch, self.num_points, self.dim = b, n, d
        self.device = features.device
        # The slice constant of permutohedral.cpp ("Alpha is a magic scaling constant").
        self.alpha = 1.0 / (1.0 + 2.0 ** (-d))
        on_cpu = features.device.type == "cpu"
        if backend == "numba" and not (on_cpu and _cpu_lattice.AVAILABLE):
            raise RuntimeError("the numba lattice needs numba installed (pip install numba) and CPU features")
        # The compiled build on the CPU; tensor ops elsewhere (CUDA), without numba or for huge keys.
        # The compiled build keeps keys in int32: |elevated| < 2 (d + 1)^2 max|feature|.
        fits = on_cpu and float(features.abs().max()) * 2 * (d + 1) ** 2 < 2**30
        self.compiled = backend != "torch" and fits and _cpu_lattice.AVAILABLE
        with torch.no_grad():
            if self.compiled:
                self._build_compiled(features.detach().reshape(b * n, d))
            else:
                self._build(features.detach().reshape(b * n, d))

    def _build_compiled(self, features: Tensor) -> None:
        d1 = self.dim + 1
        feats = features.to(torch.float32).contiguous().numpy()
        slice_idx, bary, splat_src, splat_w, splat_off, blur_idx = _cpu_lattice.build(
            feats, self.batch, _elevation_scale(self.dim).numpy())
        m = blur_idx.shape[1] // 3 - 1
        self.num_vertices = m
        self._slice_idx = torch.from_numpy(slice_idx)
        self._slice_off = torch.arange(0, slice_idx.shape[0], d1, dtype=torch.int32)
        self._slice_bary = torch.from_numpy(bary)
        self._splat_idx = torch.from_numpy(splat_src)
        self._splat_bary = torch.from_numpy(splat_w)
        self._splat_off = torch.from_numpy(splat_off)
        self._blur_idx = torch.from_numpy(blur_idx)
        self._blur_off = torch.arange(0, 3 * (m + 1), 3, dtype=torch.int32)
        self._blur_w = torch.tensor([0.5, 1.0, 0.5], dtype=torch.float32).repeat(m + 1)

    def _build(self, features: Tensor) -> None:
        b, n, d = self.batch, self.num_points, self.dim
        d1 = d + 1
        dev = features.device
        p = b * n
        rem0, rank, bary = _simplex(_elevate(features))
        inverse, perm, counts, neighbours = _hash(rem0, rank, b, n)
        del rem0, rank
        m = counts.numel()
        self.num_vertices = m
        # embedding_bag takes int32 indices: half the memory and bandwidth of int64.
        idx_dtype = torch.int32 if max(p * d1, m) < 2**31 else torch.int64
        # Slice: point i gathers its d+1 vertices (a bag of d+1 per point).
        # Flat indices with precomputed bag offsets: a 2-D input makes embedding_bag build
        # the offsets (an arange) on every call.
        self._slice_idx = inverse.to(idx_dtype)
        self._slice_off = torch.arange(0, p * d1, d1, dtype=idx_dtype, device=dev)
        self._slice_bary = bary
        # Splat (the transpose): vertex k gathers the points that touch it (sorted by vertex).
        self._splat_idx = torch.div(perm, d1, rounding_mode="floor").to(idx_dtype)
        self._splat_bary = bary.reshape(-1)[perm]
        # One extra, empty bag: vertex M is a zero row (the C++ code's "-1 -> 0" neighbour).
        self._splat_off = torch.cat([torch.cumsum(counts, 0) - counts, counts.new_full((1,), p * d1)]).to(idx_dtype)
        del perm, inverse, counts
        # Blur along direction j: v_k + 0.5 (v_n1 + v_n2), an absent neighbour read from the zero
        # row M; the zero row's own bag (M, M, M) keeps it zero.
        missing = neighbours < 0  # (d1, 2, M)
        neighbours[missing] = m
        nb = neighbours.to(idx_dtype)
        del neighbours, missing
        self_idx = torch.arange(m + 1, device=dev, dtype=idx_dtype)
        pad = torch.full((d1, 1), m, dtype=idx_dtype, device=dev)
        self._blur_idx = torch.stack(
            [torch.cat([nb[:, 0], pad], 1), self_idx.expand(d1, m + 1), torch.cat([nb[:, 1], pad], 1)], 2
        )  # (d1, M+1, 3)
        # Materialised: embedding_bag would copy an expanded tensor on every call.
        self._blur_idx = self._blur_idx.reshape(d1, 3 * (m + 1))
        self._blur_off = torch.arange(0, 3 * (m + 1), 3, dtype=idx_dtype, device=dev)
        self._blur_w = torch.tensor([0.5, 1.0, 0.5], dtype=torch.float32, device=dev).repeat(m + 1)

    def repeat(self, copies: int) -> PermutohedralLattice:
        """This lattice for ``copies`` images with the same features, without a rebuild.

        The result holds ``copies`` independent blocks (each with its own zero row), as if the
        features had been batched: the same filter as building on the repeated features.
        """
        if self.batch != 1:
            raise ValueError(f"only a single-image lattice can be repeated, this one has {self.batch} images")
        rep = object.__new__(PermutohedralLattice)
        rep.__dict__.update(self.__dict__)
        rows, n, d1 = self.num_vertices + 1, self.num_points, self.dim + 1
        k = torch.arange(copies, device=self.device, dtype=self._slice_idx.dtype)[:, None]
        rep.batch = copies
        rep.num_vertices = copies * rows - 1  # the last block's zero row is the lattice's
        rep._slice_idx = (self._slice_idx[None] + k * rows).reshape(-1)
        rep._slice_off = torch.arange(0, copies * n * d1, d1, dtype=self._slice_off.dtype, device=self.device)
        rep._slice_bary = self._slice_bary.repeat(copies, 1)
        rep._splat_idx = (self._splat_idx[None] + k.to(self._splat_idx.dtype) * n).reshape(-1)
        rep._splat_bary = self._splat_bary.repeat(copies)
        # Block b's M+1 bags start after the b earlier blocks' n * d1 entries (its zero row's bag
        # is empty: it starts where block b+1's first bag does).
        rep._splat_off = (self._splat_off[None] + k.to(self._splat_off.dtype) * (n * d1)).reshape(-1)
        rep._blur_idx = (self._blur_idx[:, None] + k.to(self._blur_idx.dtype)[None] * rows).reshape(d1, -1)
        rep._blur_off = torch.arange(0, 3 * copies * rows, 3, dtype=self._blur_off.dtype, device=self.device)
        rep._blur_w = self._blur_w.repeat(copies)
        return rep

    def filter(self, values: Tensor, reverse: bool = False) -> Tensor:
        """Gaussian-filter ``values`` (``(N, C)``, ``(B, N, C)`` or ``(B*N, C)``; float32/64).

        Differentiable with respect to ``values`` (the backward is the transposed filter).
        ``reverse`` blurs the directions in the opposite order, which is the transposed filter.
        """
        shape = values.shape
        p = self.batch * self.num_points
        if values.dim() not in (2, 3) or values.numel() % p or values.shape[-2] not in (p, self.num_points):
            raise ValueError(
                f"values {tuple(shape)} do not match the lattice's {self.batch} x {self.num_points} points: "
                "pass (N, C), (B, N, C) or (B*N, C)"
            )
        # Built per call, not kept: a filter stored here would make a reference cycle
        # (lattice <-> filter) that only the cyclic GC frees, holding tens of MB per lattice.
        return LatticeFilter(self, None, None)(values.reshape(p, -1), reverse).reshape(shape)


def _hash(rem0: Tensor, rank: Tensor, b: int, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Find the lattice vertices of every simplex and their blur neighbours.

    Vertex r of a point's simplex has the key ``rem0_i + r - (d+1) [rank_i > d - r]``
    (i < d; the last coordinate is implied by the zero sum). Returns ``inverse`` (P*(d+1),) the
    vertex index of each (point, r), ``perm`` the (point, r) entries sorted by vertex,
    ``counts`` (M,) entries per vertex and ``neighbours`` (d+1, 2, M) (-1: absent).
    Keys are packed into one int64 (image index in the top bits) so dedup is one sort and the
    neighbour lookup a binary search; keys too wide to pack fall back to row-wise unique.
    """
    p, d1 = rem0.shape
    d = d1 - 1
    dev = rem0.device
    lo = rem0[:, :d].amin(0) - 2 * d1  # margin: vertex offsets (-d1..d) and neighbour steps (-1, +d)
    hi = rem0[:, :d].amax(0) + 2 * d1
    bits = [max(1, math.ceil(math.log2(int(w) + 1))) for w in (hi - lo).tolist()]
    batch_bits = math.ceil(math.log2(b)) if b > 1 else 0
    if sum(bits) + batch_bits > _PACK_BITS:
        return _hash_rows(rem0, rank, b, n)
    shifts = [0]
    for nbits in bits[:-1]:
        shifts.append(shifts[-1] + nbits)
    unit = torch.tensor([1 << s for s in shifts] + [0], dtype=torch.int64, device=dev)  # (d1,)
    base = ((rem0 - torch.cat([lo, lo.new_zeros(1)])) * unit).sum(1)
    if b > 1:
        base += torch.arange(b, device=dev).repeat_interleave(n) << sum(bits)
    # sum_i unit_i [rank_i > d - r] = sum of the units of the r highest ranks: a cumsum over
    # the units placed at their rank, read from the top.
    by_rank = torch.zeros_like(rem0).scatter_(1, rank, unit.expand(p, d1))
    top = torch.cumsum(torch.flip(by_rank, (1,)), 1)
    r = torch.arange(d1, device=dev)
    packed = base[:, None] + r * unit.sum()
    packed[:, 1:] -= d1 * top[:, :d]
    del by_rank, top, base
    sorted_keys, perm = torch.sort(packed.reshape(-1))
    del packed
    uniq, inv_sorted, counts = torch.unique_consecutive(sorted_keys, return_inverse=True, return_counts=True)
    del sorted_keys
    inverse = torch.empty_like(inv_sorted).scatter_(0, perm, inv_sorted)
    del inv_sorted
    m = uniq.numel()
    # Neighbour along direction j: every coordinate -1 except j, which is +d (j = d: all -1).
    delta = torch.full((d1, d), -1, dtype=torch.int64, device=dev)
    delta[torch.arange(d, device=dev), torch.arange(d, device=dev)] = d
    step = (delta * unit[:d]).sum(1)  # (d1,)
    # Only the +step neighbours are searched: n2 is the inverse of n1 (n1(k) = k' iff n2(k') = k).
    queries = uniq + step[:, None]  # (d1, M)
    if int(uniq[-1]) + int(step.abs().max()) < 2**31:
        # Narrow keys (positional kernels): a 32-bit binary search moves half the bytes.
        uniq_s, queries = uniq.to(torch.int32), queries.to(torch.int32)
    else:
        uniq_s = uniq
    idx = torch.searchsorted(uniq_s, queries).clamp_(max=m - 1)
    found = uniq_s[idx] == queries
    del queries
    # n2 by scattering k into n1(k)'s slot; misses go to a spare column m, dropped after.
    neighbours = torch.full((d1, 2, m + 1), -1, dtype=torch.int64, device=dev)
    target = torch.where(found, idx, m)
    neighbours[:, 0, :m] = torch.where(found, idx, -1)
    neighbours[:, 1].scatter_(1, target, torch.arange(m, device=dev).expand(d1, m))
    neighbours = neighbours[:, :, :m]
    return inverse, perm, counts, neighbours


def _hash_rows(rem0: Tensor, rank: Tensor, b: int, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``_hash`` for keys wider than an int64 (tiny standard deviations): unique over key rows."""
    p, d1 = rem0.shape
    d = d1 - 1
    dev = rem0.device
    r = torch.arange(d1, device=dev)
    keys = rem0[:, None, :d] + r[None, :, None] - d1 * (rank[:, None, :d] > (d - r)[None, :, None])
    keys = keys.reshape(p * d1, d)
    delta = torch.full((d1, d), -1, dtype=torch.int64, device=dev)
    delta[torch.arange(d, device=dev), torch.arange(d, device=dev)] = d
    if b > 1:
        img = torch.arange(b, device=dev).repeat_interleave(n * d1)
        keys = torch.cat([img[:, None], keys], 1)
        delta = torch.cat([torch.zeros(d1, 1, dtype=torch.int64, device=dev), delta], 1)
    uniq, inverse, counts = torch.unique(keys, dim=0, sorted=True, return_inverse=True, return_counts=True)
    m = uniq.shape[0]
    perm = torch.argsort(inverse, stable=True)
    queries = torch.stack([uniq[None] + delta[:, None], uniq[None] - delta[:, None]], 1).reshape(-1, uniq.shape[1])
    both, inv2 = torch.unique(torch.cat([uniq, queries]), dim=0, sorted=True, return_inverse=True)
    table = torch.full((both.shape[0],), -1, dtype=torch.int64, device=dev)
    table[inv2[:m]] = torch.arange(m, device=dev)
    neighbours = table[inv2[m:]].reshape(d1, 2, m)
    return inverse, perm, counts, neighbours
