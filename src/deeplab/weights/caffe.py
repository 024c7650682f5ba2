"""Read (and, for tests, write) Caffe ``.caffemodel`` files straight from the protobuf wire format.

No Caffe and no protobuf package are needed: a caffemodel is a serialised ``caffe.NetParameter``
and only a handful of its fields matter for weights. Field numbers, from BVLC's
``src/caffe/proto/caffe.proto`` (the DeepLab forks keep them):

- ``NetParameter``: ``repeated LayerParameter layer = 100`` and the deprecated
  ``repeated V1LayerParameter layers = 2``.
- ``LayerParameter``: ``name = 1`` (string), ``type = 2`` (string), ``repeated BlobProto blobs = 7``,
  ``ConvolutionParameter convolution_param = 106``.
- ``V1LayerParameter``: ``name = 4`` (string), ``LayerType type = 5`` (enum: CONVOLUTION = 4,
  INNER_PRODUCT = 14, ...), ``repeated BlobProto blobs = 6``, ``convolution_param = 10``.
- ``BlobProto``: ``BlobShape shape = 7``, ``repeated float data = 5 [packed = true]``,
  ``repeated double double_data = 8 [packed = true]`` and the deprecated 4-D shape
  ``num = 1, channels = 2, height = 3, width = 4``.
- ``BlobShape``: ``repeated int64 dim = 1 [packed = true]``.
- ``ConvolutionParameter``: ``num_output = 1``, ``repeated pad = 3``, ``repeated kernel_size = 4``,
  ``repeated stride = 6``, ``repeated dilation = 18``, ``pad_h/pad_w = 9/10``,
  ``kernel_h/kernel_w = 11/12``, ``stride_h/stride_w = 13/14``.

Wire format: every field is a varint key ``(field_number << 3) | wire_type``; wire types 0
(varint), 1 (8 bytes), 2 (length-delimited: strings, sub-messages, packed arrays), 5 (4 bytes).
A writer may emit a repeated scalar packed (one wire-type-2 field) or one element per field;
a conforming parser accepts both, and so does this one.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deeplab.fileio import atomic_open

__all__ = [
    "CaffeModelError",
    "CaffeLayer",
    "ConvGeometry",
    "read_caffemodel",
    "write_caffemodel",
]

# NetParameter
_NET_LAYER = 100
_NET_LAYERS_V1 = 2
# LayerParameter
_LAYER_NAME, _LAYER_TYPE, _LAYER_BLOBS, _LAYER_CONV = 1, 2, 7, 106
# V1LayerParameter
_V1_NAME, _V1_TYPE, _V1_BLOBS, _V1_CONV = 4, 5, 6, 10
# BlobProto
_BLOB_NUM, _BLOB_CHANNELS, _BLOB_HEIGHT, _BLOB_WIDTH = 1, 2, 3, 4
_BLOB_DATA, _BLOB_SHAPE, _BLOB_DOUBLE_DATA = 5, 7, 8
# ConvolutionParameter
_CONV_NUM_OUTPUT, _CONV_PAD, _CONV_KERNEL, _CONV_STRIDE, _CONV_DILATION = 1, 3, 4, 6, 18
_CONV_PAD_H, _CONV_PAD_W, _CONV_KERNEL_H, _CONV_KERNEL_W, _CONV_STRIDE_H, _CONV_STRIDE_W = (
    9, 10, 11, 12, 13, 14,
)

# V1LayerParameter.LayerType values (caffe.proto) for the layer types a weights file holds.
V1_LAYER_TYPES: dict[int, str] = {
    4: "Convolution",
    14: "InnerProduct",
    39: "Deconvolution",
    0: "",
}
_V1_TYPE_IDS = {v: k for k, v in V1_LAYER_TYPES.items() if v}

_WT_VARINT, _WT_I64, _WT_LEN, _WT_I32 = 0, 1, 2, 5


class CaffeModelError(ValueError):
    """A ``.caffemodel`` file could not be parsed (truncated, not a caffemodel, unexpected content)."""


@dataclass(frozen=True)
class ConvGeometry:
    """Spatial settings of a Caffe convolution (``None`` where the file does not say)."""

    num_output: int | None = None
    kernel_size: tuple[int, int] | None = None
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int] = (0, 0)
    # None where the file cannot say: legacy V1 files come from forks that stored the atrous
    # rate in fork-specific fields ("hole"), so field 18 is not read there.
    dilation: tuple[int, int] | None = (1, 1)


@dataclass
class CaffeLayer:
    """One layer of a caffemodel: its name, type and parameter blobs (float32 arrays)."""

    name: str
    type: str
    blobs: list[np.ndarray] = field(default_factory=list)
    conv: ConvGeometry | None = None


class _Truncated(Exception):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise _Truncated
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise CaffeModelError("varint longer than 10 bytes")


def _fields(buf: memoryview, start: int, end: int):
    """Yield ``(field_number, wire_type, value)``; value is an int or a ``(start, end)`` span."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise CaffeModelError("field number 0 (not a protobuf message)")
        if wire == _WT_VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == _WT_LEN:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Truncated
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire == _WT_I32:
            if pos + 4 > end:
                raise _Truncated
            yield number, wire, (pos, pos + 4)
            pos += 4
        elif wire == _WT_I64:
            if pos + 8 > end:
                raise _Truncated
            yield number, wire, (pos, pos + 8)
            pos += 8
        else:
            # 3/4 are proto1 groups, which caffe.proto never uses; 6/7 do not exist.
            raise CaffeModelError(f"unsupported wire type {wire} for field {number}")


def _packed_varints(buf: memoryview, span: tuple[int, int]) -> list[int]:
    out = []
    pos, end = span
    while pos < end:
        v, pos = _varint(buf, pos, end)
        out.append(v)
    return out


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _parse_shape(buf: memoryview, span: tuple[int, int]) -> list[int]:
    dims: list[int] = []
    for number, wire, value in _fields(buf, *span):
        if number != 1:
            continue
        if wire == _WT_LEN:
            dims.extend(_signed64(v) for v in _packed_varints(buf, value))
        elif wire == _WT_VARINT:
            dims.append(_signed64(value))
    return dims


class _Values:
    """The values of one repeated float field (``data`` float32 or ``double_data`` float64).

    Packed runs and single (non-packed) elements may interleave; file order is kept.
    """

    def __init__(self, dtype: str, fmt: str, name: str) -> None:
        self.dtype, self.fmt, self.name = np.dtype(dtype), fmt, name
        self.chunks: list[np.ndarray] = []
        self.singles: list[float] = []

    def add(self, buf: memoryview, wire: int, value, packed_wire: int, single_wire: int) -> None:
        if wire == packed_wire:
            a, b = value
            if (b - a) % self.dtype.itemsize:
                raise CaffeModelError(f"packed {self.name} data length is not a multiple of {self.dtype.itemsize}")
            self._flush()
            self.chunks.append(np.frombuffer(buf[a:b], dtype=self.dtype))
        elif wire == single_wire:
            self.singles.append(struct.unpack_from(self.fmt, buf, value[0])[0])

    def _flush(self) -> None:
        if self.singles:
            self.chunks.append(np.asarray(self.singles, dtype=self.dtype))
            self.singles = []

    def array(self) -> np.ndarray | None:
        """All values as a float32 copy (never a view of the mapped file), or None if absent."""
        self._flush()
        if not self.chunks:
            return None
        return np.concatenate(self.chunks).astype(np.float32)


def _parse_blob(buf: memoryview, span: tuple[int, int]) -> np.ndarray:
    shape: list[int] | None = None
    legacy = [0, 0, 0, 0]
    has_legacy = False
    floats = _Values("<f4", "<f", "float")
    doubles = _Values("<f8", "<d", "double")
    for number, wire, value in _fields(buf, *span):
        if number == _BLOB_DATA:
            floats.add(buf, wire, value, _WT_LEN, _WT_I32)
        elif number == _BLOB_DOUBLE_DATA:
            doubles.add(buf, wire, value, _WT_LEN, _WT_I64)
        elif number == _BLOB_SHAPE and wire == _WT_LEN:
            shape = _parse_shape(buf, value)
        elif number in (_BLOB_NUM, _BLOB_CHANNELS, _BLOB_HEIGHT, _BLOB_WIDTH) and wire == _WT_VARINT:
            legacy[number - 1] = _signed64(value)
            has_legacy = True
    data = floats.array()
    if data is None:
        data = doubles.array()
    if data is None:
        data = np.zeros(0, dtype=np.float32)
    if shape is None:
        # Caffe's legacy 4-D shape; an absent field reads as 0 in proto2 but means "no such
        # axis" for old blobs, which always carried all four.
        shape = legacy if has_legacy else [data.size]
    count = int(np.prod(shape)) if shape else 1
    if count != data.size:
        raise CaffeModelError(f"blob of shape {tuple(shape)} holds {data.size} values, expected {count}")
    return data.reshape(shape)


def _pair(values: list[int], h: int | None, w: int | None, default: int) -> tuple[int, int]:
    if h is not None or w is not None:
        return (h if h is not None else default, w if w is not None else default)
    if not values:
        return (default, default)
    if len(values) == 1:
        return (values[0], values[0])
    return (values[0], values[1])


def _parse_conv(buf: memoryview, span: tuple[int, int], v1: bool) -> ConvGeometry:
    lists: dict[int, list[int]] = {_CONV_PAD: [], _CONV_KERNEL: [], _CONV_STRIDE: [], _CONV_DILATION: []}
    singles: dict[int, int] = {}
    num_output = None
    for number, wire, value in _fields(buf, *span):
        if number in lists:
            if wire == _WT_LEN:
                lists[number].extend(_packed_varints(buf, value))
            elif wire == _WT_VARINT:
                lists[number].append(value)
        elif number == _CONV_NUM_OUTPUT and wire == _WT_VARINT:
            num_output = value
        elif number in (_CONV_PAD_H, _CONV_PAD_W, _CONV_KERNEL_H, _CONV_KERNEL_W,
                        _CONV_STRIDE_H, _CONV_STRIDE_W) and wire == _WT_VARINT:
            singles[number] = value
    kernel = lists[_CONV_KERNEL]
    kh, kw = singles.get(_CONV_KERNEL_H), singles.get(_CONV_KERNEL_W)
    kernel_size = _pair(kernel, kh, kw, 1) if (kernel or kh or kw) else None
    return ConvGeometry(
        num_output=num_output,
        kernel_size=kernel_size,
        stride=_pair(lists[_CONV_STRIDE], singles.get(_CONV_STRIDE_H), singles.get(_CONV_STRIDE_W), 1),
        pad=_pair(lists[_CONV_PAD], singles.get(_CONV_PAD_H), singles.get(_CONV_PAD_W), 0),
        dilation=None if v1 else _pair(lists[_CONV_DILATION], None, None, 1),
    )


def _parse_layer(buf: memoryview, span: tuple[int, int], v1: bool) -> CaffeLayer:
    name_f, type_f, blobs_f, conv_f = (
        (_V1_NAME, _V1_TYPE, _V1_BLOBS, _V1_CONV) if v1 else (_LAYER_NAME, _LAYER_TYPE, _LAYER_BLOBS, _LAYER_CONV)
    )
    name = ""
    type_ = ""
    blobs: list[np.ndarray] = []
    conv = None
    for number, wire, value in _fields(buf, *span):
        if number == name_f and wire == _WT_LEN:
            name = bytes(buf[value[0]:value[1]]).decode("utf-8", errors="replace")
        elif number == type_f:
            if v1 and wire == _WT_VARINT:
                type_ = V1_LAYER_TYPES.get(value, f"V1Type{value}")
            elif not v1 and wire == _WT_LEN:
                type_ = bytes(buf[value[0]:value[1]]).decode("utf-8", errors="replace")
        elif number == blobs_f and wire == _WT_LEN:
            blobs.append(_parse_blob(buf, value))
        elif number == conv_f and wire == _WT_LEN:
            conv = _parse_conv(buf, value, v1)
    return CaffeLayer(name=name, type=type_, blobs=blobs, conv=conv)


def _parse_net(buf: memoryview, size: int) -> list[CaffeLayer]:
    layers: list[CaffeLayer] = []
    for number, wire, value in _fields(buf, 0, size):
        if number == _NET_LAYER and wire == _WT_LEN:
            layers.append(_parse_layer(buf, value, v1=False))
        elif number == _NET_LAYERS_V1 and wire == _WT_LEN:
            layers.append(_parse_layer(buf, value, v1=True))
    return layers


def read_caffemodel(path: str | os.PathLike[str]) -> list[CaffeLayer]:
    """Parse a ``.caffemodel`` (``caffe.NetParameter``) and return its layers in file order.

    Both encodings are read: ``layer`` (field 100, current Caffe) and the legacy ``layers``
    (field 2, ``V1LayerParameter``). Layers without blobs are kept (the caller decides).

    Args:
        path: the caffemodel file. It is memory-mapped (the OS pages it in and may drop the
            pages again) and each blob's floats are copied out of the map with one numpy copy.

    Raises:
        CaffeModelError: the file is truncated, is not a protobuf, or holds no layers.
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise CaffeModelError(f"{path}: empty file, not a caffemodel")
    error: str | None = None
    layers: list[CaffeLayer] = []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            layers = _parse_net(buf, size)
        except _Truncated:
            error = (
                "truncated or corrupt caffemodel (a field runs past the end of the file); "
                "download it again"
            )
        except CaffeModelError as e:
            error = f"not a valid caffemodel ({e})"
        # Released only after the except clauses above have dropped their tracebacks, which
        # hold views into the mapping.
        buf.release()
    if error is not None:
        raise CaffeModelError(f"{path}: {error}")
    if not layers:
        raise CaffeModelError(
            f"{path}: no Caffe layers found (NetParameter fields 100/2): not a .caffemodel? "
            "(a .prototxt holds the architecture, not the weights)"
        )
    if not any(layer.blobs for layer in layers):
        raise CaffeModelError(f"{path}: the caffemodel has layers but no weights (blobs)")
    return layers


# ---------------------------------------------------------------------------------------------
# Writer: the inverse of the reader, small and slow, for tests and for tools that hand weights
# back to Caffe users.


def _enc_varint(v: int) -> bytes:
    if v < 0:
        v += 1 << 64
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _enc_key(number: int, wire: int) -> bytes:
    return _enc_varint((number << 3) | wire)


def _enc_len(number: int, payload: bytes) -> bytes:
    return _enc_key(number, _WT_LEN) + _enc_varint(len(payload)) + payload


def _enc_repeated_varint(number: int, values: Iterable[int], packed: bool) -> bytes:
    values = list(values)
    if not values:
        return b""
    if packed:
        return _enc_len(number, b"".join(_enc_varint(v) for v in values))
    return b"".join(_enc_key(number, _WT_VARINT) + _enc_varint(v) for v in values)


def _enc_blob(array: np.ndarray, *, legacy_shape: bool, packed: bool, double: bool) -> bytes:
    array = np.asarray(array)
    out = bytearray()
    if legacy_shape:
        if array.ndim > 4:
            raise ValueError("the legacy blob shape holds at most 4 axes")
        dims = [1] * (4 - array.ndim) + list(array.shape)
        for number, d in zip((_BLOB_NUM, _BLOB_CHANNELS, _BLOB_HEIGHT, _BLOB_WIDTH), dims):
            out += _enc_key(number, _WT_VARINT) + _enc_varint(d)
    else:
        out += _enc_len(_BLOB_SHAPE, _enc_repeated_varint(1, array.shape, packed))
    flat = array.reshape(-1)
    number, dtype, wire = (
        (_BLOB_DOUBLE_DATA, "<f8", _WT_I64) if double else (_BLOB_DATA, "<f4", _WT_I32)
    )
    if packed:
        out += _enc_len(number, flat.astype(dtype).tobytes())
    else:
        key = _enc_key(number, wire)
        out += b"".join(key + np.asarray(v, dtype=dtype).tobytes() for v in flat)
    return bytes(out)


def _enc_conv(conv: ConvGeometry, packed: bool) -> bytes:
    def one_or_two(pair: tuple[int, int]) -> list[int]:
        # Caffe writes a single value when height and width agree.
        return [pair[0]] if pair[0] == pair[1] else list(pair)

    out = bytearray()
    if conv.num_output is not None:
        out += _enc_key(_CONV_NUM_OUTPUT, _WT_VARINT) + _enc_varint(conv.num_output)
    if conv.kernel_size is not None:
        out += _enc_repeated_varint(_CONV_KERNEL, one_or_two(conv.kernel_size), packed)
    out += _enc_repeated_varint(_CONV_STRIDE, one_or_two(conv.stride), packed)
    out += _enc_repeated_varint(_CONV_PAD, one_or_two(conv.pad), packed)
    if conv.dilation is not None:
        out += _enc_repeated_varint(_CONV_DILATION, one_or_two(conv.dilation), packed)
    return bytes(out)


def write_caffemodel(
    path: str | os.PathLike[str],
    layers: Sequence[CaffeLayer],
    *,
    legacy: bool = False,
    packed: bool = True,
    double: bool = False,
) -> None:
    """Write layers as a ``caffe.NetParameter`` in the wire format (atomically).

    Args:
        path: destination file.
        layers: the layers to write (name, type, blobs, optional convolution geometry).
        legacy: write the deprecated ``layers`` field (``V1LayerParameter``: enum types,
            4-D ``num/channels/height/width`` blob shapes) instead of ``layer``.
        packed: write repeated numbers packed (Caffe's own choice) or one field per element.
        double: store blob values in ``double_data`` instead of ``data``.
    """
    body = bytearray()
    body += _enc_len(1, b"deeplab-test-net")  # NetParameter.name
    for layer in layers:
        msg = bytearray()
        if legacy:
            msg += _enc_len(_V1_NAME, layer.name.encode())
            msg += _enc_key(_V1_TYPE, _WT_VARINT) + _enc_varint(_V1_TYPE_IDS.get(layer.type, 0))
        else:
            msg += _enc_len(_LAYER_NAME, layer.name.encode())
            msg += _enc_len(_LAYER_TYPE, layer.type.encode())
        for blob in layer.blobs:
            msg += _enc_len(
                _V1_BLOBS if legacy else _LAYER_BLOBS,
                _enc_blob(blob, legacy_shape=legacy, packed=packed, double=double),
            )
        if layer.conv is not None:
            msg += _enc_len(_V1_CONV if legacy else _LAYER_CONV, _enc_conv(layer.conv, packed))
        body += _enc_len(_NET_LAYERS_V1 if legacy else _NET_LAYER, bytes(msg))
    path = Path(path)
    with atomic_open(path) as f:
        f.write(body)
