"""Reading reference data for ``guard calibrate``.

Rows from ``.npy``, ``.npz`` (the array ``X``, or the only array), ``.csv``
(numbers, an optional header line), or ``.jsonl`` of recorded requests; texts
from ``.txt`` (one prompt per line) or ``.jsonl``. A ``.jsonl`` line may be:

* a JSON array: one row (``[1, 2, 3]``) or several (``[[1, 2], [3, 4]]``);
* ``{"instances": [...]}`` or ``{"inputs": [[...], ...]}`` (TF-Serving / KServe v1);
* ``{"inputs": [{"data": [...], "shape": [n, d], ...}]}`` (Open Inference
  Protocol v2; the first input tensor, reshaped);
* ``{"dataframe_split": {"data": [[...]]}}`` (MLflow);
* ``{"messages": [{"role": "user", "content": "..."}]}`` (chat: each user
  message is a text), ``{"prompt": "..."}`` (completions), or a JSON string.

This is deliberately a small reader of our own: ``guard/`` does not import
the middleware's request adapters. Nothing here unpickles anything.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["DataError", "ReferenceData", "load_reference"]


class DataError(ValueError):
    """Reference data that cannot be read; the message says where and why."""


@dataclass(frozen=True, slots=True)
class ReferenceData:
    """Rows or texts read from a reference file."""

    #: ``(n, d)`` float64 rows, or ``None`` for texts
    rows: NDArray[np.float64] | None
    #: prompt texts, or ``()`` for rows
    texts: tuple[str, ...]
    #: where they came from, for the report
    source: str
    #: the model's ``(n, classes)`` probabilities for ``rows`` (``.npz`` array ``proba``)
    probabilities: NDArray[np.float64] | None = None
    #: the model's predicted class per row (``.npz`` array ``labels``)
    labels: NDArray[np.int64] | None = None

    @property
    def predicted(self) -> NDArray[np.int64] | None:
        """The model's class per row: ``labels``, or the argmax of ``probabilities``."""
        if self.labels is not None:
            return self.labels
        if self.probabilities is not None:
            return np.asarray(np.argmax(self.probabilities, axis=1), dtype=np.int64)
        return None

    def __len__(self) -> int:
        return len(self.texts) if self.rows is None else int(self.rows.shape[0])


def load_reference(path: str | Path) -> ReferenceData:
    """Read reference rows or texts from ``path``, by its extension."""
    p = Path(path)
    suffix = p.suffix.lower()
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    if suffix == ".npy":
        rows = _checked_rows(_load_npy(p), str(p))
    elif suffix == ".npz":
        arrays = _load_npz(p)
        rows = _checked_rows(arrays.pop("X"), str(p))
        probs, labels = _answers(arrays, rows.shape[0], str(p))
        return ReferenceData(rows, (), str(p), probs, labels)
    elif suffix == ".csv":
        rows = _checked_rows(_load_csv(p), str(p))
    elif suffix == ".txt":
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
        texts = tuple(ln for ln in lines if ln)
        if not texts:
            raise DataError(f"{p}: no prompts")
        return ReferenceData(None, texts, str(p))
    elif suffix in (".jsonl", ".ndjson"):
        return _load_jsonl(p)
    else:
        raise DataError(f"{p}: unsupported file type {suffix!r} (.npy .npz .csv .jsonl .txt)")
    return ReferenceData(rows, (), str(p))


def _checked_rows(arr: NDArray[Any], where: str) -> NDArray[np.float64]:
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{where}: array of dtype {arr.dtype} is not numeric")
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise DataError(f"{where}: expected a 2-D (rows, features) array, got shape {arr.shape}")
    out = np.asarray(arr, dtype=np.float64)
    if not np.isfinite(out).all():
        raise DataError(f"{where}: contains NaN or infinity")
    return out


def _load_npy(p: Path) -> NDArray[Any]:
    try:
        arr: NDArray[Any] = np.load(p, allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"{p}: not a plain numeric .npy file: {exc}") from exc
    return arr


#: the ``.npz`` arrays that hold the model's answers on the reference rows
ANSWER_ARRAYS = ("proba", "labels")


def _load_npz(p: Path) -> dict[str, NDArray[Any]]:
    """``X`` (the rows; or the only array) and any of :data:`ANSWER_ARRAYS`."""
    try:
        with np.load(p, allow_pickle=False) as npz:
            names = list(npz.files)
            if "X" in names:
                name = "X"
            elif len(names) == 1:
                name = names[0]
            else:
                raise DataError(
                    f"{p}: holds {names}; name the reference array 'X' (and the model's "
                    "answers on it 'proba' or 'labels')"
                )
            out: dict[str, NDArray[Any]] = {"X": npz[name]}
            for extra in ANSWER_ARRAYS:
                if extra in names and extra != name:
                    out[extra] = npz[extra]
    except DataError:
        raise
    except (OSError, ValueError) as exc:
        raise DataError(f"{p}: not a plain numeric .npz file: {exc}") from exc
    return out


def _answers(
    arrays: dict[str, NDArray[Any]], n: int, where: str
) -> tuple[NDArray[np.float64] | None, NDArray[np.int64] | None]:
    """The model's answers: ``proba`` ``(n, k)`` in [0, 1], ``labels`` ``(n,)`` integers."""
    probs = arrays.get("proba")
    labels = arrays.get("labels")
    if probs is not None:
        if probs.dtype.kind not in "biuf" or probs.ndim != 2 or probs.shape[0] != n:
            raise DataError(f"{where}: 'proba' must be a ({n}, classes) array, got {probs.shape}")
        probs = np.asarray(probs, dtype=np.float64)
        if probs.shape[1] < 2 or not np.isfinite(probs).all() or (probs < 0).any():
            raise DataError(f"{where}: 'proba' must hold finite probabilities for >= 2 classes")
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.shape != (n,) or (labels < 0).any():
            raise DataError(
                f"{where}: 'labels' must be ({n},) non-negative integers, got "
                f"{labels.dtype} {labels.shape}"
            )
        labels = np.asarray(labels, dtype=np.int64)
    return probs, labels


def _load_csv(p: Path) -> NDArray[Any]:
    rows: list[list[float]] = []
    with open(p, newline="", encoding="utf-8") as fh:
        for lineno, record in enumerate(csv.reader(fh), start=1):
            if not record or all(not cell.strip() for cell in record):
                continue
            try:
                rows.append([float(cell) for cell in record])
            except ValueError:
                if lineno == 1 and not rows:
                    continue  # a header line
                raise DataError(f"{p}:{lineno}: not a number in {record!r:.80}") from None
            if len(rows[-1]) != len(rows[0]):
                raise DataError(f"{p}:{lineno}: {len(rows[-1])} columns, expected {len(rows[0])}")
    if not rows:
        raise DataError(f"{p}: no rows")
    return np.asarray(rows, dtype=np.float64)


def _load_jsonl(p: Path) -> ReferenceData:
    blocks: list[NDArray[np.float64]] = []
    texts: list[str] = []
    with open(p, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{where}: invalid JSON: {exc}") from None
            got_rows, got_texts = _parse_request(obj, where)
            if got_rows is not None:
                if blocks and got_rows.shape[1] != blocks[0].shape[1]:
                    raise DataError(
                        f"{where}: rows of {got_rows.shape[1]} features, "
                        f"earlier lines had {blocks[0].shape[1]}"
                    )
                blocks.append(got_rows)
            texts.extend(got_texts)
            if blocks and texts:
                raise DataError(f"{where}: the file mixes rows and texts")
    if blocks:
        return ReferenceData(_checked_rows(np.vstack(blocks), str(p)), (), str(p))
    if texts:
        return ReferenceData(None, tuple(texts), str(p))
    raise DataError(f"{p}: no rows or texts")


def _parse_request(obj: object, where: str) -> tuple[NDArray[np.float64] | None, list[str]]:
    if isinstance(obj, str):
        return None, [obj]
    if isinstance(obj, list):
        return _matrix(obj, where), []
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON array, object or string")
    if "messages" in obj:
        return None, _chat_texts(obj["messages"], where)
    if "prompt" in obj:
        prompt = obj["prompt"]
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not all(isinstance(t, str) for t in prompts):
            raise DataError(f"{where}: 'prompt' must be a string or a list of strings")
        return None, list(prompts)
    if "instances" in obj:
        return _matrix(obj["instances"], where), []
    if "inputs" in obj:
        inputs = obj["inputs"]
        if isinstance(inputs, list) and inputs and isinstance(inputs[0], dict):
            return _oip_tensor(inputs[0], where), []
        return _matrix(inputs, where), []
    if "dataframe_split" in obj and isinstance(obj["dataframe_split"], dict):
        return _matrix(obj["dataframe_split"].get("data"), where), []
    raise DataError(f"{where}: unrecognised request (keys: {', '.join(sorted(map(str, obj)))})")


def _chat_texts(messages: object, where: str) -> list[str]:
    if not isinstance(messages, list):
        raise DataError(f"{where}: 'messages' must be a list")
    out: list[str] = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role", "user") != "user":
            continue
        content = m.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):  # [{"type": "text", "text": "..."}]
            parts = [c.get("text") for c in content if isinstance(c, dict)]
            text = "\n".join(t for t in parts if isinstance(t, str))
            if text:
                out.append(text)
    return out


def _oip_tensor(tensor: dict[str, Any], where: str) -> NDArray[np.float64]:
    data, shape = tensor.get("data"), tensor.get("shape")
    flat = np.asarray(list(_flatten(data, where)), dtype=np.float64)
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise DataError(f"{where}: OIP v2 input needs an integer 'shape'")
    n_elems = int(np.prod(shape)) if shape else 1
    if n_elems != flat.size:
        raise DataError(f"{where}: shape {shape} does not hold {flat.size} values")
    if len(shape) == 1:
        return flat.reshape(1, -1)
    return flat.reshape(shape[0], -1)


def _flatten(data: object, where: str) -> Iterable[float]:
    if isinstance(data, bool):
        raise DataError(f"{where}: booleans are not features")
    if isinstance(data, int | float):
        yield float(data)
    elif isinstance(data, list):
        for item in data:
            yield from _flatten(item, where)
    else:
        raise DataError(f"{where}: expected numbers, got {type(data).__name__}")


def _matrix(data: object, where: str) -> NDArray[np.float64]:
    if not isinstance(data, list) or not data:
        raise DataError(f"{where}: expected a non-empty list of rows")
    if all(isinstance(x, int | float) and not isinstance(x, bool) for x in data):
        data = [data]
    rows = []
    for row in data:
        if not isinstance(row, list):
            raise DataError(f"{where}: each row must be a list of numbers")
        rows.append(list(_flatten(row, where)))
    if len({len(r) for r in rows}) != 1 or not rows[0]:
        raise DataError(f"{where}: rows have different or zero lengths")
    return np.asarray(rows, dtype=np.float64)
