"""Classifier heads on the sentence encoder: tasks, data, training, metrics, artefacts.

A head is multinomial logistic regression on all-MiniLM-L6-v2's frozen, L2-normalised
sentence vectors (``mlengine.inference.encoder``): ``p = softmax(W·x + b)``, with class weights
inversely proportional to class frequency (so that macro-averaged metrics, not the
majority class, drive it) and its regularisation strength picked on the evaluation
split. The tasks are TweetEval's (Barbieri et al., "TweetEval: Unified Benchmark and
Comparative Evaluation for Tweet Classification", Findings of EMNLP 2020), with its
official metrics: macro-averaged recall for sentiment, macro-F1 for emotion and
offensive.

An artefact is a ``.npz`` of the labels, ``W`` and ``b`` (no pickle: loading one runs no
code), under ``settings.MODELS_DIR``; its ``ModelVersion`` row says what it was trained
on, how it measured, and whether it is the task's active head.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ENCODER_NAME = "all-MiniLM-L6-v2"


@dataclass(frozen=True, slots=True)
class Task:
    """A classification task: its labels (index = TweetEval's label id) and the name of
    its official metric (``macro_recall`` or ``macro_f1``)."""

    name: str
    labels: tuple[str, ...]
    metric: str


TASKS: dict[str, Task] = {
    "sentiment": Task("sentiment", ("negative", "neutral", "positive"), "macro_recall"),
    "emotion": Task("emotion", ("anger", "joy", "optimism", "sadness"), "macro_f1"),
    "offensive": Task("offensive", ("not-offensive", "offensive"), "macro_f1"),
}


class UnknownTask(ValueError):
    """A task name that is not one of ``TASKS``."""


class DataError(ValueError):
    """A data folder or split that cannot be read as TweetEval's layout."""


def task(name: str) -> Task:
    """The task called ``name``.

    Raises:
        UnknownTask: no such task (the message lists the known ones).
    """
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTask(f"unknown task {name!r}: one of {', '.join(sorted(TASKS))}") from None


def read_split(data: Path, split: str, the_task: Task) -> tuple[list[str], list[int]]:
    """Texts and label ids of ``DIR/SPLIT_text.txt`` and ``DIR/SPLIT_labels.txt``
    (TweetEval's layout: one text, and one integer label, per line).

    Raises:
        DataError: a file is missing, the two differ in length, or a label is not an
            integer id of the task.
    """
    text_path, label_path = data / f"{split}_text.txt", data / f"{split}_labels.txt"
    for path in (text_path, label_path):
        if not path.is_file():
            raise DataError(f"no split {split!r} in {data}: {path.name} is missing")
    texts = text_path.read_text(encoding="utf-8", errors="replace").split("\n")
    labels_raw = label_path.read_text(encoding="utf-8").split("\n")
    if texts and texts[-1] == "":
        texts.pop()
    if labels_raw and labels_raw[-1] == "":
        labels_raw.pop()
    if len(texts) != len(labels_raw):
        raise DataError(f"{split}: {len(texts)} texts but {len(labels_raw)} labels in {data}")
    labels = []
    for line, raw in enumerate(labels_raw, 1):
        try:
            label = int(raw.strip())
        except ValueError:
            raise DataError(f"{label_path.name}:{line}: {raw!r} is not a label id") from None
        if not 0 <= label < len(the_task.labels):
            last = len(the_task.labels) - 1
            raise DataError(
                f"{label_path.name}:{line}: label {label} is not one of 0..{last}"
                f" ({the_task.name}: {', '.join(the_task.labels)})"
            )
        labels.append(label)
    return texts, labels


def available_splits(data: Path) -> list[str]:
    """Names of the splits in ``data`` with both a text and a labels file, sorted."""
    return sorted(
        path.name.removesuffix("_text.txt")
        for path in data.glob("*_text.txt")
        if (data / path.name.replace("_text.txt", "_labels.txt")).is_file()
    )


def default_splits(data: Path) -> tuple[list[str], str | None]:
    """``(training splits, evaluation split)`` to use when none are named: ``train``
    when there is one (evaluated on ``val`` if present), else ``val`` alone (evaluated on
    a held-out part of it). A split whose name starts with ``test`` is never chosen.

    Raises:
        DataError: no public split to train on.
    """
    public = [s for s in available_splits(data) if not s.startswith("test")]
    if "train" in public:
        return ["train"], ("val" if "val" in public else None)
    if "val" in public:
        return ["val"], None
    if public:
        return public, None
    raise DataError(f"no training split in {data} (splits starting with 'test' are never used)")


def metrics(the_task: Task, y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, Any]:
    """The task's scores of ``y_pred`` against ``y_true`` (label ids): ``macro_recall``,
    ``macro_f1``, ``accuracy`` and ``per_class`` (precision, recall, F1, support by
    label name). Values are fractions in [0, 1], rounded to 4 places."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    ids = list(range(len(the_task.labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=ids, zero_division=0
    )
    return {
        "macro_recall": round(float(np.mean(recall)), 4),
        "macro_f1": round(float(np.mean(f1)), 4),
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 4),
        "per_class": {
            label: {
                "precision": round(float(precision[i]), 4),
                "recall": round(float(recall[i]), 4),
                "f1": round(float(f1[i]), 4),
                "support": int(support[i]),
            }
            for i, label in enumerate(the_task.labels)
        },
    }


def per_class_lines(per_class: dict[str, dict[str, Any]]) -> list[str]:
    """``metrics()["per_class"]`` as one aligned line per label (for the commands)."""
    return [
        f"  {label:>14}: precision {s['precision']:.4f}  recall {s['recall']:.4f}"
        f"  f1 {s['f1']:.4f}  n {s['support']}"
        for label, s in per_class.items()
    ]


@dataclass(frozen=True)
class Head:
    """A trained head: ``weights`` (labels × 384), ``bias`` (labels), for ``labels``."""

    labels: tuple[str, ...]
    weights: np.ndarray
    bias: np.ndarray

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        """Softmax probabilities, shape (n, labels), of encoder ``vectors`` (n, 384)."""
        logits = vectors @ self.weights.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def predict(self, vectors: np.ndarray) -> np.ndarray:
        """Label ids, shape (n,)."""
        return self.probabilities(vectors).argmax(axis=1)

    def save(self, path: Path) -> str:
        """Write the artefact to ``path`` (``.npz``); return its SHA-256."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as fh:
            np.savez(
                fh,
                labels=np.array(self.labels),
                weights=self.weights.astype(np.float32),
                bias=self.bias.astype(np.float32),
                encoder=np.array(ENCODER_NAME),
            )
        return hashlib.sha256(path.read_bytes()).hexdigest()

    @classmethod
    def load(cls, path: Path) -> Head:
        """Read an artefact written by ``save`` (no pickle).

        Raises:
            FileNotFoundError: no such file.
            ValueError: not an artefact of this encoder.
        """
        with np.load(path, allow_pickle=False) as data:
            if str(data["encoder"]) != ENCODER_NAME:
                raise ValueError(f"{path}: a head of {data['encoder']}, not {ENCODER_NAME}")
            return cls(
                labels=tuple(str(label) for label in data["labels"]),
                weights=np.asarray(data["weights"], dtype=np.float32),
                bias=np.asarray(data["bias"], dtype=np.float32),
            )


C_GRID = (0.25, 1.0, 4.0, 16.0)
"""Inverse regularisation strengths tried; the best on the evaluation split is kept."""


def fit(
    the_task: Task,
    train_vectors: np.ndarray,
    train_labels: Sequence[int],
    eval_vectors: np.ndarray,
    eval_labels: Sequence[int],
    *,
    max_iter: int = 1000,
    progress: Callable[[str], None] | None = None,
) -> tuple[Head, dict[str, Any]]:
    """Fit a head for each of ``C_GRID`` and keep the one with the best task metric on
    the evaluation vectors. Returns the head and its evaluation ``metrics`` (plus ``C``).

    ``max_iter``: L-BFGS iterations (each a full pass over the training vectors).
    """
    from sklearn.linear_model import LogisticRegression

    best: tuple[float, Head, dict[str, Any]] | None = None
    classes = list(range(len(the_task.labels)))
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=max_iter, class_weight="balanced")
        model.fit(train_vectors, list(train_labels))
        head = _head_of(the_task, model, classes)
        scores = metrics(the_task, eval_labels, head.predict(eval_vectors).tolist())
        if progress is not None:
            progress(f"C={c}: {the_task.metric} {scores[the_task.metric]}")
        if best is None or scores[the_task.metric] > best[0]:
            best = (scores[the_task.metric], head, {**scores, "C": c})
    assert best is not None
    return best[1], best[2]


def _head_of(the_task: Task, model: Any, classes: list[int]) -> Head:
    """``model``'s parameters as a softmax head over every label of the task (a label
    absent from the training data gets a weight row of zeros and a very low bias)."""
    weights = np.zeros((len(classes), model.coef_.shape[1]), dtype=np.float32)
    bias = np.full(len(classes), -1e4, dtype=np.float32)
    seen = [int(c) for c in model.classes_]
    if len(seen) == 2:
        # Binary logistic regression: sigmoid(w·x + b) = softmax([0, w·x + b])[1].
        weights[seen[1]] = model.coef_[0]
        bias[seen[0]], bias[seen[1]] = 0.0, model.intercept_[0]
    else:
        for row, label in enumerate(seen):
            weights[label] = model.coef_[row]
            bias[label] = model.intercept_[row]
    return Head(labels=the_task.labels, weights=weights, bias=bias)


def holdout(labels: Sequence[int], fraction: float = 0.2, seed: int = 13) -> np.ndarray:
    """A boolean mask of a stratified ``fraction`` of ``labels`` (deterministic)."""
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels)
    mask = np.zeros(len(labels_array), dtype=bool)
    for label in np.unique(labels_array):
        index = np.flatnonzero(labels_array == label)
        take = max(1, round(len(index) * fraction)) if len(index) > 1 else 0
        mask[rng.choice(index, size=take, replace=False)] = True
    return mask
