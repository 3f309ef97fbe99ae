"""Deterministic random weights for a SAM-architecture state dict, in plain numpy.

Used twice:

* ``scripts/reference/record_segment_anything.py`` (throw-away env with Meta's
  ``segment_anything``) fills ``build_sam_vit_b(checkpoint=None)`` with these
  values and records reference outputs in ``tests/fixtures/sam_vit_b_reference.npz``;
* medfm's tests regenerate the *identical* arrays from
  ``tests/fixtures/sam_vit_b_keys.json`` (key -> shape) without
  ``segment_anything``, load them into medfm's own SAM, and compare outputs.

This module imports nothing but numpy. Do not change the rules below without
re-recording the fixtures: the fixture stores a SHA-256 fingerprint of the
generated weights (see :func:`state_dict_fingerprint`) so a silent change is
caught.

Rules, applied per key in ``sorted(key_shapes)`` order, each key consuming
exactly ``prod(shape)`` draws of ``rng.standard_normal(shape)`` (float64) from
ONE ``np.random.default_rng(seed)`` stream; the value is computed in float64 and
then cast with ``.astype(np.float32)``:

1. last name component ``positional_encoding_gaussian_matrix`` -> ``z``
   (SAM's own init is ``1.0 * randn``)
2. last name component in ``{pos_embed, rel_pos_h, rel_pos_w}`` -> ``0.02 * z``
3. name ends with ``bias``                                       -> ``0.02 * z``
4. any other 1-D tensor (LayerNorm / LayerNorm2d weights)        -> ``1 + 0.1 * z``
5. everything else (Linear, Conv, ConvTranspose, Embedding weights)
   -> ``z / sqrt(fan_in)`` with ``fan_in = prod(shape[1:])`` (torch's convention,
   also for ConvTranspose2d whose weight is ``(in, out, kh, kw)``)

Caveat: numpy documents that ``Generator`` streams may change between numpy
versions (in practice ``standard_normal`` of PCG64 has been stable since numpy
1.17). The fingerprint in the fixture detects it.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

__all__ = ["random_state_dict", "state_dict_fingerprint", "DEFAULT_SEED"]

DEFAULT_SEED = 20240607


def _rule(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """Return (offset, scale) so that value = offset + scale * z."""
    last = key.rsplit(".", 1)[-1]
    if last == "positional_encoding_gaussian_matrix":
        return 0.0, 1.0
    if last in ("pos_embed", "rel_pos_h", "rel_pos_w"):
        return 0.0, 0.02
    if key.endswith("bias"):
        return 0.0, 0.02
    if len(shape) == 1:
        return 1.0, 0.1
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return 0.0, 1.0 / math.sqrt(max(fan_in, 1))


def random_state_dict(key_shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Generate float32 arrays for every key of ``key_shapes`` (see module doc)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for key in sorted(key_shapes):
        shape = tuple(int(s) for s in key_shapes[key])
        offset, scale = _rule(key, shape)
        z = rng.standard_normal(shape)  # float64
        out[key] = (offset + scale * z).astype(np.float32)
    return out


def state_dict_fingerprint(state: dict[str, np.ndarray]) -> str:
    """SHA-256 over (key, shape, little-endian float32 bytes) in sorted key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        arr = np.ascontiguousarray(state[key], dtype="<f4")
        h.update(key.encode("utf-8"))
        h.update(repr(tuple(arr.shape)).encode("ascii"))
        h.update(arr.tobytes())
    return h.hexdigest()
