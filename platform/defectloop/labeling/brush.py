"""Label Studio brush masks: the RLE codec, vectorised with numpy.

Label Studio stores a brush mask as a bit-stream RLE (thi.ng rle-pack) over the flattened
H x W x 4 RGBA array; the mask is the alpha channel. The SDK's own codec
(``label_studio_sdk.converter.brush``) builds strings of '0'/'1' characters and takes seconds on a
camera-sized image; this one produces the same bytes (tested bit-exact) in milliseconds.

Stream: 32-bit value count, 5-bit word size - 1, four 4-bit run-length field sizes - 1, then
records ``[repeat flag][2-bit size index][length - 1][value(s)]``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

_WORD = 8
_RLE_SIZES = (3, 4, 8, 16)  # the SDK's encoder sizes; the decoder reads them from the header


class MaskCodec(Protocol):
    """How a boolean mask travels to and from the labeling tool."""

    def encode(self, mask: np.ndarray) -> list[int]: ...

    def decode(self, data: list[int], height: int, width: int) -> np.ndarray: ...


def _bits(values: np.ndarray, width: int) -> np.ndarray:
    """Big-endian bits of each value: N x width uint8."""
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    return ((values.astype(np.uint64)[:, None] >> shifts) & 1).astype(np.uint8)


def _runs(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, values) of the runs of equal values in a flat array."""
    if not len(arr):
        return np.zeros(0, np.int64), arr[:0]
    ends = np.append(np.flatnonzero(arr[1:] != arr[:-1]), len(arr) - 1)
    return np.diff(np.append(-1, ends)), arr[ends]


class BrushRLE:
    """Label Studio's brush RLE, bit-exact with the SDK's ``mask2rle`` / ``decode_rle``."""

    def encode(self, mask: np.ndarray) -> list[int]:
        """H x W bool (or 0/255) mask -> RLE bytes as Label Studio expects (alpha = 255 under the mask)."""
        if mask.ndim != 2:
            raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
        # the SDK encodes the RGBA array, each pixel's value four times over: its runs are the
        # pixels' runs, four times as long (found on the mask itself: a 49 MP image's RGBA array is 196 MB)
        lengths, values = _runs(mask.astype(bool, copy=False).ravel())
        return self._encode(4 * mask.size, 4 * lengths, np.where(values, 255, 0))

    @classmethod
    def encode_values(cls, arr: np.ndarray) -> list[int]:
        """Encode a flat uint8 array exactly like the SDK's ``encode_rle`` (default sizes 3, 4, 8, 16)."""
        lengths, values = _runs(arr)
        return cls._encode(len(arr), lengths, values.astype(np.int64))

    @staticmethod
    def _encode(n: int, lengths: np.ndarray, values: np.ndarray) -> list[int]:
        """The RLE bytes of ``n`` values in runs of ``lengths`` x ``values``."""
        header = [_bits(np.array([n]), 32), _bits(np.array([_WORD - 1]), 5),
                  _bits(np.array([s - 1 for s in _RLE_SIZES]), 4).ravel()[None]]
        if n:
            values = values.astype(np.int64)
            # runs longer than 2**16 are split into full 2**16 blocks plus the remainder (as the SDK does)
            blocks = np.where(lengths > 2**16, (lengths - 1) // 2**16, 0)
            rep = blocks + 1
            run = np.repeat(np.arange(len(lengths)), rep)
            first_of_run = np.concatenate([[0], np.cumsum(rep)[:-1]])
            k = np.arange(len(run)) - np.repeat(first_of_run, rep)
            last = k == blocks[run]
            rec_len = np.where(last, lengths[run] - blocks[run] * 2**16, 2**16)
            rec_val = values[run]
            # size index: 0 for length <= 8 (single values too), 1 <= 16, 2 <= 256, else 3; long runs always 3
            idx = np.select([rec_len <= 8, rec_len <= 16, rec_len <= 256], [0, 1, 2], 3)
            idx = np.where(blocks[run] > 0, 3, idx)
            size = np.array(_RLE_SIZES)[idx]
            flag = (rec_len > 1).astype(np.int64)
            stored = np.where(flag == 1, rec_len - 1, 0)
            stored = np.where(~last, 2**16 - 1, stored)
            nbits = 1 + 2 + size + _WORD
            code = (flag << (2 + size + _WORD)) | (idx << (size + _WORD)) | (stored << _WORD) | rec_val
            width = int(nbits.max())
            bits = _bits(code << (width - nbits), width)
            body = bits[np.arange(width)[None, :] < nbits[:, None]]
        else:
            body = np.zeros(0, np.uint8)
        stream = np.concatenate([h.ravel() for h in header] + [body])
        pad = 8 - len(stream) % 8  # the SDK always pads, a full zero byte when already aligned
        stream = np.concatenate([stream, np.zeros(pad, np.uint8)])
        return np.packbits(stream).tolist()

    def decode(self, data: list[int] | bytes, height: int, width: int) -> np.ndarray:
        """RLE bytes -> H x W bool mask (the alpha channel of the decoded RGBA array)."""
        values = self.decode_values(data)
        if values.size != height * width * 4:
            raise ValueError(f"brush RLE holds {values.size} values, expected {height}x{width}x4 = {height * width * 4}")
        return values.reshape(height, width, 4)[:, :, 3] > 0

    @staticmethod
    def decode_values(data: list[int] | bytes) -> np.ndarray:
        """Decode to the flat array of values (as the SDK's ``decode_rle``)."""
        raw = np.frombuffer(bytes(bytearray(data)), dtype=np.uint8)
        bits = np.unpackbits(raw)
        pos = 0

        def read(n: int) -> int:
            nonlocal pos
            if pos + n > len(bits):
                raise ValueError("brush RLE ends early (truncated or not an RLE)")
            v = 0
            for b in bits[pos:pos + n]:
                v = (v << 1) | int(b)
            pos += n
            return v

        num = read(32)
        word = read(5) + 1
        sizes = [read(4) + 1 for _ in range(4)]
        if num > 2**31 or word > 16:
            raise ValueError("not a brush RLE (implausible header)")
        out = np.zeros(num, dtype=np.uint8 if word <= 8 else np.uint16)
        i = 0
        while i < num:
            repeat = read(1)
            j = min(num, i + 1 + read(sizes[read(2)]))
            if repeat:
                out[i:j] = read(word)
            else:
                for t in range(i, j):
                    out[t] = read(word)
            i = j
        return out
