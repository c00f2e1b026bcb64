"""Checksums of saved arrays: written with every training checkpoint and model directory,
verified when they are read back, so that bytes flipped on disk (same size, still decodable)
are caught instead of training or evaluating garbage.

What is summed: the values being saved, on the devices that hold them, before the save starts
(`tree_checksums`), and the values restored, after a restore (`verify`). Not the files: Orbax
saves asynchronously and, with several hosts, every process writes only the shards it owns, so
no process ever sees a whole file set; the values are the same on every mesh and host count,
and a jitted reduction over the global arrays gives every process the same replicated result
(a few integers per array) at the cost of one pass over the state on the devices. A resume on
another mesh verifies against the same numbers. NumPy arrays (tools that never build the model)
are summed on the host by the same formula, in blocks.

Formula ("sum32x2"): each array is split into *units*, the chunks emo_jax stores it in
(`unit_axes` leading axes: one layer of the stacked blocks, one expert of one layer of an expert
stack, else the whole array; see `unit_axes`), so a reader of single experts (lazy extraction)
can verify what it reads. A unit's values, as unsigned integers of their width w_i in row-major
order i, give two 32-bit sums, a = sum w_i (2i + 1) and b = sum fmix32(w_i ^ i * 0x9E3779B1),
mod 2^32. Integer sums are exact whatever the reduction order or sharding; any change of one
value changes a (2i + 1 is odd, so invertible mod 2^32); other changes go unnoticed with
probability about 2^-64. The sums of disjoint parts of a unit add up, which lets blocks be
summed separately.

Stored as {"algorithm": "sum32x2", "arrays": {"params/blocks/moe/w_gate": {"dtype", "shape",
"unit_axes", "sums": hex string, 16 digits per unit}}}: in a training checkpoint's `meta` item
(key "checksums"), in a model directory as checksums.json. A checkpoint without them (written
before they existed) is read unverified.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

ALGORITHM = "sum32x2"
FILE = "checksums.json"
_GOLDEN = 0x9E3779B1
# Stacked expert weights [L, E, ...] (as model_files.EXPERT_STACKS; no import: model_files
# imports this module).
_EXPERT_STACKS = ("w_gate", "w_up", "w_down", "shared_gate", "shared_up", "shared_down")
_NUMPY_BLOCK = 1 << 22  # elements summed at a time on the host


class ChecksumMismatch(ValueError):
    """Restored values differ from those saved; the message names the arrays."""


def unit_axes(name: str) -> int:
    """Leading axes that index the units of the params array `name` ('params/blocks/...')."""
    parts = name.split("/")
    if parts[0] == "params":
        parts = parts[1:]
    if not parts or parts[0] != "blocks":
        return 0
    return 2 if parts[-1] in _EXPERT_STACKS else 1


def _fmix(h, xp):
    h = h ^ (h >> xp.uint32(16))
    h = h * xp.uint32(0x85EBCA6B)
    h = h ^ (h >> xp.uint32(13))
    h = h * xp.uint32(0xC2B2AE35)
    return h ^ (h >> xp.uint32(16))


def _sums(words, index, xp, axis=-1):
    """[..., 2] sums over `axis` of words (uint32) at flat unit positions index (uint32)."""
    a = xp.sum(words * (index * xp.uint32(2) + xp.uint32(1)), axis=axis, dtype=xp.uint32)
    b = xp.sum(_fmix(words ^ (index * xp.uint32(_GOLDEN)), xp), axis=axis, dtype=xp.uint32)
    return xp.stack([a, b], axis=-1)


def _jax_words(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = x.dtype.itemsize * 8
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)


def _tree_sums(leaves, units):
    out = []
    for x, k in zip(leaves, units):
        w = _jax_words(x)  # no reshape: sharded arrays are summed where they are
        index, stride = jnp.zeros((), jnp.uint32), 1
        for axis in reversed(range(k, w.ndim)):
            index = index + (jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis)
                             * jnp.uint32(stride % 2**32))
            stride *= w.shape[axis]
        out.append(_sums(w, index, jnp, axis=tuple(range(k, w.ndim))))
    return out


@functools.lru_cache(maxsize=None)
def _jitted(out_sharding, count: int):
    if out_sharding is None:
        return jax.jit(_tree_sums, static_argnums=1)
    return jax.jit(_tree_sums, static_argnums=1, out_shardings=[out_sharding] * count)


def _device_sums(leaves, units) -> list:
    """[units, 2] uint32 sums of jax arrays (a collective: every process calls it), replicated
    on the leaves' mesh so that every process can read them."""
    return jax.device_get(_jitted(_replicated(leaves), len(leaves))(list(leaves), tuple(units)))


def _numpy_words(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        return x.astype(np.uint32)
    if x.dtype.itemsize == 8:  # no 64-bit values on a device without x64: two words each
        return x.view(np.uint32)
    return x.view(np.dtype(f"uint{x.dtype.itemsize * 8}")).astype(np.uint32)


def numpy_sums(values, k: int, offset: int = 0) -> np.ndarray:
    """[units, 2] uint32 sums of a NumPy block: `k` leading unit axes; `offset` is the flat
    position in its unit of the block's first value (a block of a larger unit)."""
    w = _numpy_words(np.asarray(values))
    w = w.reshape((int(np.prod(w.shape[:k], dtype=np.int64)), -1))
    total = np.zeros((w.shape[0], 2), np.uint32)
    with np.errstate(over="ignore"):
        for start in range(0, w.shape[1], _NUMPY_BLOCK):
            part = w[:, start:start + _NUMPY_BLOCK]
            index = np.arange(offset + start, offset + start + part.shape[1],
                              dtype=np.uint64).astype(np.uint32)
            total += _sums(part, index, np)
    return total


def hexsums(sums) -> str:
    return "".join(f"{int(a):08x}{int(b):08x}" for a, b in np.asarray(sums).reshape(-1, 2))


def _flat(tree, prefix: str) -> list[tuple[str, object]]:
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join([prefix] + [str(getattr(k, "key", getattr(k, "idx", k))) for k in path])
        out.append((name, leaf))
    return out


def _replicated(leaves):
    """out_shardings for the jitted sums: replicated on the leaves' mesh, so every process
    can read them (None: single-device or unsharded leaves)."""
    for leaf in leaves:
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return None


def _dtype_name(x) -> str:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return "key<" + str(jax.random.key_impl(x)) + ">"
    return str(np.dtype(x.dtype))


def tree_checksums(tree, prefix: str, *, units: bool = True) -> dict:
    """{name: {dtype, shape, unit_axes, sums}} of every array of `tree` (jax arrays summed on
    their devices, every process calling it; NumPy arrays on the host). `units=False`: one unit
    per array (optimizer state)."""
    named = _flat(tree, prefix)
    out = {}
    device = [(n, x) for n, x in named if isinstance(x, jax.Array)]
    if device:
        ks = tuple(unit_axes(n) if units else 0 for n, _ in device)
        sums = _device_sums([x for _, x in device], ks)
        for (name, x), k, s in zip(device, ks, sums):
            out[name] = {"dtype": _dtype_name(x), "shape": list(x.shape), "unit_axes": k,
                         "sums": hexsums(s)}
    for name, x in named:
        if name in out:
            continue
        x = np.asarray(x)
        k = unit_axes(name) if units else 0
        out[name] = {"dtype": str(x.dtype), "shape": list(x.shape), "unit_axes": k,
                     "sums": hexsums(numpy_sums(x, k))}
    return out


def record(arrays: dict) -> dict:
    return {"algorithm": ALGORITHM, "arrays": arrays}


def _describe_unit(entry: dict, unit: int) -> str:
    k = entry["unit_axes"]
    if k == 0:
        return ""
    shape = entry["shape"][:k]
    idx = np.unravel_index(unit, shape)
    return " (layer %d%s)" % (idx[0], f", expert {idx[1]}" if k == 2 else "")


def mismatch_message(bad: list[tuple[str, dict, int]]) -> str:
    """'checksum mismatch in params/x (layer 1) and 2 more arrays' from (name, entry, unit)."""
    name, entry, unit = bad[0]
    more = f" and {len(bad) - 1} more array{'s' if len(bad) > 2 else ''}" if len(bad) > 1 else ""
    return (f"checksum mismatch in {name}{_describe_unit(entry, unit)}{more}: the stored "
            "values differ from those saved (corrupted on disk)")


def _first_bad_unit(expected: str, got: str) -> int:
    for i in range(0, max(len(expected), len(got)), 16):
        if expected[i:i + 16] != got[i:i + 16]:
            return i // 16
    return 0


def verify(tree, prefix: str, saved: dict | None):
    """Raises ChecksumMismatch if a restored array of `tree` differs from what `saved` (a
    `record`) says was saved. Arrays it has no entry for, and a missing or unknown record, are
    not verified. Restored values cast to another dtype (a bfloat16 model read as float32) are
    cast back first (exact)."""
    if not saved or saved.get("algorithm") != ALGORITHM:
        return
    entries = saved.get("arrays", {})
    named = [(n, x) for n, x in _flat(tree, prefix) if n in entries]
    device, host, ks = [], [], []
    for name, x in named:
        entry = entries[name]
        if list(x.shape) != list(entry["shape"]):
            continue
        if entry["dtype"] != _dtype_name(x):
            try:
                target = np.dtype(entry["dtype"])
            except TypeError:
                continue
            if target.itemsize == 8 and isinstance(x, jax.Array):
                continue  # not representable on the device: unverified
            x = x.astype(target) if isinstance(x, jax.Array) else np.asarray(x).astype(target)
        (device if isinstance(x, jax.Array) else host).append((name, x))
    got = {}
    if device:
        ks = tuple(entries[n]["unit_axes"] for n, _ in device)
        for (name, _), s in zip(device, _device_sums([x for _, x in device], ks)):
            got[name] = hexsums(s)
    for name, x in host:
        got[name] = hexsums(numpy_sums(x, entries[name]["unit_axes"]))
    bad = [(n, entries[n], _first_bad_unit(entries[n]["sums"], s))
           for n, s in got.items() if s != entries[n]["sums"]]
    if bad:
        raise ChecksumMismatch(mismatch_message(bad))


def unit_hex(entry: dict, unit: int) -> str:
    return entry["sums"][unit * 16:(unit + 1) * 16]
