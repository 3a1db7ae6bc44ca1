"""A character n-gram language model over printable ASCII (private).

Symbols: 0 for anything that is not printable ASCII or a newline (non-ASCII,
control characters), 1..95 for ``' '..'~'``, 96 for newline (tab and carriage
return count as spaces), and a start-of-text symbol that pads each text.

Probabilities use Witten-Bell interpolation, order by order, from an add-one
unigram model up::

    P_k(c | h) = (C(h, c) + T(h) * P_{k-1}(c | h')) / (C(h) + T(h))

where ``h`` is the ``k - 1`` preceding symbols, ``h'`` the ``k - 2`` of them,
``C(h)`` how often ``h`` was seen as a context and ``T(h)`` how many distinct
symbols followed it; an unseen context falls back to ``P_{k-1}``. Witten-Bell
needs no tuning: a context followed by many different symbols trusts its own
counts less.

The k-grams are stored sparsely, as sorted integer keys (the symbols of the
k-gram read as a base-``V`` number) with their counts; lookups are
``searchsorted``, vectorised over a whole text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["BOS", "NEWLINE", "OOV", "CharNGram", "V", "codepoints", "encode"]

OOV, NEWLINE, BOS = 0, 96, 97
#: alphabet size (including the start symbol)
V = 98
#: V**MAX_ORDER must fit in int64
MAX_ORDER = 6

_TABLE = np.zeros(128, dtype=np.int64)
_TABLE[32:127] = np.arange(1, 96)
_TABLE[ord("\n")] = NEWLINE
_TABLE[ord("\t")] = _TABLE[ord("\r")] = _TABLE[ord(" ")]

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]


def codepoints(text: str) -> NDArray[np.uint32]:
    """The code points of ``text`` (lone surrogates included, never an exception)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def encode(text: str | NDArray[np.uint32]) -> IntArray:
    """Symbols of a text (or of its code points)."""
    cp = codepoints(text) if isinstance(text, str) else text
    symbols: IntArray = _TABLE[np.minimum(cp, 127)] * (cp < 128)
    return symbols


def _grams(symbols: IntArray, k: int) -> IntArray:
    """Key of the k-gram ending at each position (start-padded)."""
    padded = np.concatenate((np.full(k - 1, BOS, dtype=np.int64), symbols))
    n = symbols.size
    key = np.zeros(n, dtype=np.int64)
    for j in range(k):
        key = key * V + padded[j : j + n]
    return key


def _lookup(keys: IntArray, values: FloatArray, query: IntArray) -> FloatArray:
    pos = np.minimum(np.searchsorted(keys, query), keys.size - 1)
    found: FloatArray = np.where(keys[pos] == query, values[pos], 0.0)
    return found


class CharNGram:
    """Counts of an order-``n`` character model and the probabilities they imply."""

    def __init__(
        self, order: int, unigram: FloatArray, grams: Sequence[tuple[IntArray, FloatArray]]
    ) -> None:
        if not 1 <= order <= MAX_ORDER or len(grams) != order - 1:
            raise ValueError(f"order must be in 1..{MAX_ORDER} with one table per order above 1")
        if unigram.shape != (V,) or (unigram < 0).any():
            raise ValueError("unigram counts must be V non-negative numbers")
        for k, (keys, counts) in enumerate(grams, start=2):
            if (
                keys.ndim != 1 or counts.shape != keys.shape or keys.size < 1
                or (keys < 0).any() or (keys >= V**k).any() or (np.diff(keys) <= 0).any()
                or (counts <= 0).any()
            ):
                raise ValueError(f"the {k}-gram table is malformed")
        self.order = order
        self.unigram = unigram
        self.grams = list(grams)
        self._p1 = (unigram + 1.0) / (unigram.sum() + V)
        # per context: how often it was seen, and how many distinct symbols followed it
        self._contexts: list[tuple[IntArray, FloatArray, FloatArray]] = []
        for keys, counts in self.grams:
            ctx, inverse = np.unique(keys // V, return_inverse=True)
            seen = np.bincount(inverse, weights=counts).astype(np.float64)
            types = np.bincount(inverse).astype(np.float64)
            self._contexts.append((ctx, seen, types))

    @classmethod
    def fit(cls, texts: Sequence[str], order: int) -> CharNGram:
        """Count the symbols and k-grams of ``texts``."""
        symbols = [encode(t) for t in texts]
        flat = np.concatenate(symbols) if symbols else np.zeros(0, dtype=np.int64)
        unigram = np.bincount(flat, minlength=V).astype(np.float64)
        grams = []
        for k in range(2, order + 1):
            all_keys = np.concatenate([_grams(s, k) for s in symbols if s.size])
            keys, counts = np.unique(all_keys, return_counts=True)
            grams.append((keys.astype(np.int64), counts.astype(np.float64)))
        return cls(order, unigram, grams)

    def log_probs(self, symbols: IntArray) -> FloatArray:
        """Natural-log probability of each symbol given the ones before it."""
        n = symbols.size
        padded = np.concatenate((np.full(self.order - 1, BOS, dtype=np.int64), symbols))
        p = self._p1[symbols]
        gram = symbols.astype(np.int64)
        for k, ((keys, counts), (ctx, seen, types)) in enumerate(
            zip(self.grams, self._contexts, strict=True), start=2
        ):
            # the k-gram ending at each position: one more symbol on the left
            start = self.order - k
            gram = padded[start : start + n] * V ** (k - 1) + gram
            c_gram = _lookup(keys, counts, gram)
            h = gram // V
            pos = np.minimum(np.searchsorted(ctx, h), ctx.size - 1)
            hit = ctx[pos] == h
            c_ctx = np.where(hit, seen[pos], 0.0)
            t_ctx = np.where(hit, types[pos], 0.0)
            denom = c_ctx + t_ctx
            p = np.where(hit, (c_gram + t_ctx * p) / np.where(hit, denom, 1.0), p)
        logp: FloatArray = np.log(p)
        return logp

    def state(self) -> dict[str, NDArray[Any]]:
        """The counts, as arrays named for :meth:`from_state`."""
        out: dict[str, NDArray[Any]] = {"unigram_": self.unigram}
        for k, (keys, counts) in enumerate(self.grams, start=2):
            out[f"gram{k}_keys_"] = keys
            out[f"gram{k}_counts_"] = counts
        return out

    @classmethod
    def from_state(cls, order: int, state: dict[str, NDArray[Any]]) -> CharNGram:
        """Rebuild from :meth:`state` (validated)."""
        grams = [
            (state[f"gram{k}_keys_"].astype(np.int64), state[f"gram{k}_counts_"].astype(np.float64))
            for k in range(2, order + 1)
        ]
        return cls(order, state["unigram_"].astype(np.float64), grams)
