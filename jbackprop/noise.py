"""Standard Gaussian noise, drawn cheaply enough to be added to every gradient coordinate.

DP-SGD adds ``N(0, σ²C²)`` to all ``p`` coordinates of the clipped sum at every step, so
one step draws as many Gaussian numbers as the network has parameters: 79,510 for
784-100-10, 795,010 for 784-1000-10. ``jax.random.normal`` (with JAX's default
partitionable threefry) spends one threefry-2x32 hash, 64 bits, on every 32-bit number and
then an ``erfinv``; on a CPU that costs more than the backward pass of a minibatch of 128.
:func:`normal` draws the same distribution from half the hashes and a cheaper transform:

1. **Bits.** One threefry-2x32 hash (Salmon et al. 2011, 20 rounds, the hash
   ``jax.random`` is built on; :func:`threefry2x32` computes it bit for bit, faster on
   CPUs) of the counter ``(j, stream)`` under the key gives two independent uniform
   32-bit words ``w1_j, w2_j``; ``j`` runs over ``ceil(p / 2)``, so ``p`` numbers cost
   ``p / 2`` hashes.
2. **Box–Muller** (Box and Muller 1958). With ``U`` uniform on ``(0, 1)`` and ``Φ``
   uniform on ``[0, 2π)``, independent, ``R = sqrt(-2 ln U)`` and

       Z_1 = R cos Φ,    Z_2 = R sin Φ                                          (1)

   are two *independent* standard Gaussians, exactly: ``(Z_1, Z_2)`` has the rotation-
   invariant density ``exp(-(z_1² + z_2²)/2) / 2π``, its squared radius ``R²`` is
   ``Exp(1/2)``, i.e. ``-2 ln U``, and its angle is uniform. One hash gives one pair.
3. **The radius**, from ``w1``: its top bit picks the half of ``(0, 1)`` that ``U`` lies
   in, its 31 low bits ``k`` give ``v = (k + ½) 2⁻³²`` in ``(0, ½)``, and ``U = v`` or
   ``U = 1 - v``. ``-ln U`` keeps float32 relative precision in both halves: for
   ``U = 1 - v`` the rounded ``u = fl(1 - v)`` is corrected by its rounding error
   ``e = (1 - u) - v`` (``1 - u`` is exact, Sterbenz), ``ln(1 - v) = ln u + e/u`` to
   2⁻⁵⁰. Small radii (``U`` near 1) are thus as finely resolved as large ones. The largest
   radius is ``sqrt(2 · 33 ln 2) ≈ 6.76`` (``v = 2⁻³³``): the draws reach 6.76σ, beyond
   which a Gaussian has mass 1.4e-11; ``jax.random.normal``'s float32 draws stop at 5.17σ.
4. **The angle**, from ``w2``: 29 bits give ``θ = (k + ½)(π/4) 2⁻²⁹`` in ``(0, π/4)``,
   where ``cos θ`` and ``sin θ`` are their Taylor polynomials to degree 10 and 9
   (truncation below 2e-9, less than float32 rounding); the other 3 bits pick one of the
   8 symmetries of the square (swap the two coordinates, negate each), which carry the
   octant ``(0, π/4)`` onto the 8 octants of the circle and keep arc length, so
   ``Φ`` is uniform on the circle (it is ``2π`` times a uniform on a grid of 2³² points).

Everything after the hash is elementwise float32 arithmetic (one ``log``, one ``sqrt``,
two short polynomials), cheaper than ``erfinv``, and it fuses with the addition of the
noise. The draw is deterministic: the same key gives the same numbers in the same program
(an eager and a compiled draw may differ in the last bit, where XLA fuses a multiply and an
add). Measured on a 2-core CPU: 1.9x faster than ``jax.random.normal`` at ``p = 79,510``
and 1.8x at ``p = 795,010``; inside a private training step, where the draw runs beside
the backward pass, the noise of 784-100-10 costs about 100 µs against 300 µs for the
step's gradient (``benchmarks.md``, DP section).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.extend.random import threefry2x32_p

__all__ = ["bits", "normal", "threefry2x32"]

# XLA:CPU's threefry loop runs about 5x slower over an odd number of counters than over an
# even one; the hashes are drawn in multiples of this many and the surplus dropped.
_BLOCK = 8

# Taylor coefficients of sin θ / θ and cos θ in θ², highest first (Horner), to degree 9/10:
# on [0, π/4] the next terms are below 0.79¹¹/11! < 2e-9 and 0.79¹²/12! < 2e-10.
_SIN = tuple((-1) ** k / math.factorial(2 * k + 1) for k in range(4, -1, -1))
_COS = tuple((-1) ** k / math.factorial(2 * k) for k in range(5, -1, -1))


def _horner(coefficients: tuple[float, ...], x: Array) -> Array:
    acc = jnp.full_like(x, coefficients[0])
    for c in coefficients[1:]:
        acc = acc * x + c
    return acc


def _words(key: Array, count: int, stream: int) -> tuple[Array, Array]:
    """Two ``(count,)`` arrays of independent uniform 32-bit words from one key.

    With a threefry key (the default), pair ``j`` is the hash of the counter
    ``(j, stream)``; a key of another implementation (``"rbg"``, ``"unsafe_rbg"``) gives
    its own ``jax.random.bits`` of ``fold_in(key, stream)`` instead. Either draws a
    multiple of ``_BLOCK`` pairs and drops the surplus.
    """
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a raw key of the default implementation
    padded = -(-count // _BLOCK) * _BLOCK
    if str(jax.random.key_impl(key)) != "threefry2x32":
        bits = jax.random.bits(jax.random.fold_in(key, stream), (2, padded), jnp.uint32)
        return bits[0, :count], bits[1, :count]
    k = jax.random.key_data(key)
    j = lax.iota(jnp.uint32, padded)
    w1, w2 = threefry2x32(k[0], k[1], j, jnp.full_like(j, stream))
    return w1[:count], w2[:count]


# Threefry-2x32's rotation constants, for even and odd groups of four rounds.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry_rounds(k0: Array, k1: Array, x0: Array, x1: Array) -> tuple[Array, Array]:
    """The 20 rounds and 6 key injections of Threefry-2x32, written out one by one."""
    ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = ((x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r))) ^ x0
        x0, x1 = x0 + ks[(i + 1) % 3], x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x0, x1


def threefry2x32(k0: Array, k1: Array, x0: Array, x1: Array) -> tuple[Array, Array]:
    """The Threefry-2x32 hash (20 rounds) of the counters ``(x0, x1)`` under the key
    ``(k0, k1)``: the same two words as ``jax.random``'s own hash, bit for bit.

    On CPUs the rounds are written out and computed in a conditional whose two branches
    are this same function. JAX lowers its hash there to a loop of five steps that XLA
    runs as two loops over the counters, one per output word, each repeating the rounds;
    inlined, the rounds would instead be fused into every number that consumes the words,
    twice per pair. The conditional's branch is compiled on its own, computes each word
    once and keeps it in memory for the consumer: a private step at minibatch 128 on
    784-100-10 draws its noise in about 100 µs instead of 135 µs on a 2-core CPU. Other
    platforms use JAX's hash as it is.

    Args:
      k0, k1: the key's two ``uint32`` words (``jax.random.key_data(key)``).
      x0, x1: the counters' two words, ``uint32`` arrays of one shape.

    Returns:
      The two hashed words ``(y0, y1)``, ``uint32`` arrays of the counters' shape.
    """

    def cpu(k0, k1, x0, x1):
        # Both branches are the hash; the predicate only has to be unknown when compiling.
        # (Under jax.vmap over keys the conditional becomes a select of both branches:
        # the same words, computed twice.)
        return lax.cond((k0 | 1) != 0, _threefry_rounds, _threefry_rounds, k0, k1, x0, x1)

    def default(k0, k1, x0, x1):
        return tuple(threefry2x32_p.bind(k0, k1, x0, x1))

    return lax.platform_dependent(k0, k1, x0, x1, cpu=cpu, default=default)


def _box_muller(w1: Array, w2: Array, second: Array) -> Array:
    """Eq 1 from the words of one hash: ``Z_1`` where ``second`` is false, else ``Z_2``."""
    # radius: -ln U at full relative precision in both halves of (0, 1)
    v = ((w1 & 0x7FFFFFFF).astype(jnp.float32) + 0.5) * jnp.float32(2.0**-32)
    upper = w1 >> 31 == 0  # U = 1 - v
    u = jnp.where(upper, 1 - v, v)
    correction = jnp.where(upper, ((1 - u) - v) / u, 0)  # ln(1 - v) - ln u
    r = jnp.sqrt(-2 * (jnp.log(u) + correction))
    # angle: θ in (0, π/4) gives (cos θ, sin θ); bit 0 swaps them, bits 1 and 2 negate
    theta = ((w2 >> 3).astype(jnp.float32) + 0.5) * jnp.float32(math.pi / 4 * 2.0**-29)
    t2 = theta * theta
    cos, sin = _horner(_COS, t2), theta * _horner(_SIN, t2)
    coordinate = jnp.where(((w2 & 1) == 1) != second, sin, cos)
    negate = jnp.where(second, w2 & 4, w2 & 2) != 0
    return r * jnp.where(negate, -coordinate, coordinate)


def normal(key: Array, shape: tuple[int, ...], dtype=jnp.float32, stream: int = 0) -> Array:
    """Independent standard Gaussian numbers (traceable, deterministic in ``key``).

    An array of ``p`` numbers takes ``h = ceil(p / 2)`` hashes, of the counters
    ``(j, stream)``, ``j < h``: in row-major order its first ``h`` entries are the pairs'
    ``Z_1`` and the rest their ``Z_2`` (eq 1). Different ``stream`` values under one key
    hash different counters, so they draw independent arrays without splitting the key.
    Computed in float32 and cast to ``dtype``.

    Args:
      key: a PRNG key, typed or raw; a threefry key (JAX's default) draws as above, a
        key of another implementation draws the words with its own ``jax.random.bits``.
      shape: the shape of the result.
      dtype: its floating dtype.
      stream: which of the key's independent streams, ``0 <= stream < 2³²``.

    Returns:
      An array of ``shape`` and ``dtype``.
    """
    p = math.prod(shape)
    h = -(-p // 2)
    w1, w2 = _words(key, h, stream)
    # Computed over (2, h) from the broadcast words, the draw and its reshape to ``shape``
    # fuse into one loop (and into whatever adds the noise) without an intermediate copy.
    second = lax.broadcasted_iota(jnp.int32, (2, h), 0) == 1
    z = _box_muller(*(jnp.broadcast_to(w, (2, h)) for w in (w1, w2)), second)
    z = z.reshape(-1)
    return (z if 2 * h == p else z[:p]).reshape(shape).astype(dtype)


def bits(key: Array, count: int, stream: int = 0) -> Array:
    """Independent uniform 32-bit words, two from each hash (traceable, deterministic).

    The words of the hashes of the counters ``(j, stream)``, ``j < ceil(count / 2)``: all
    first words, then all second words, cut to ``count``: the bits :func:`normal` turns
    into Gaussians, at half the hashes of ``jax.random.bits``.

    Args:
      key: a PRNG key, typed or raw, as for :func:`normal`.
      count: the number of words.
      stream: which of the key's independent streams, ``0 <= stream < 2³²``.

    Returns:
      A ``(count,)`` ``uint32`` array.
    """
    return jnp.concatenate(_words(key, -(-count // 2), stream))[:count]
