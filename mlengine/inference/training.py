"""Training, evaluation and serving of classifier heads (``mlengine.inference.heads``), with their
``ModelVersion`` rows and artefacts under ``settings.MODELS_DIR``."""

from __future__ import annotations

import copy
import hashlib
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Max

from mlengine.inference import encoder, heads
from mlengine.inference.finetune import finetune
from mlengine.models import ModelVersion

log = structlog.get_logger(__name__)

EMBED_CHUNK = 256


class NoTrainedModel(LookupError):
    """The task has no active trained head yet (``manage.py train <task>``)."""


def embed_all(texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Encoder vectors of ``texts`` (n, 384), in chunks; ``progress(done)`` after each."""
    out = np.zeros((len(texts), encoder.DIMENSIONS), dtype=np.float32)
    model = encoder.get_encoder()
    for start in range(0, len(texts), EMBED_CHUNK):
        chunk = texts[start : start + EMBED_CHUNK]
        out[start : start + len(chunk)] = model.embed(chunk)
        if progress is not None:
            progress(len(chunk))
    return out


@dataclass(frozen=True)
class TrainingOutcome:
    """What ``train`` did: the new version, the active one's score on the same
    evaluation texts (None when there was none), whether the new one became active, and
    each method's score on the evaluation texts (the better one was kept)."""

    version: ModelVersion
    previous_score: float | None
    promoted: bool
    method_scores: dict[str, float]


FINETUNE_MAX_TEXTS = 8000
"""``method="auto"`` fine-tunes the encoder (besides fitting a frozen head) up to this
many training texts: about 10 minutes on 2 CPU cores for 3 epochs."""
METHODS = ("auto", "frozen", "finetune")


def train(
    task_name: str,
    data: Path,
    *,
    splits: Sequence[str] | None = None,
    eval_split: str | None = None,
    method: str = "auto",
    epochs: int = 3,
    embed_progress: Callable[[int], None] | None = None,
    train_progress: Callable[[int], None] | None = None,
    note: Callable[[str], None] | None = None,
) -> TrainingOutcome:
    """Train a head for ``task_name`` on ``splits`` of ``data`` (TweetEval's layout) and
    register it as a new ``ModelVersion``.

    Splits default to ``heads.default_splits``; a split named ``test*`` is trained on only
    when named. The evaluation split is ``eval_split``, else ``val`` when training on
    ``train``, else a stratified 20% held out of the training texts (not trained on).

    ``method``: "frozen" (logistic regression on the frozen sentence vectors),
    "finetune" (the encoder fine-tuned with the head for ``epochs`` epochs,
    ``mlengine.inference.finetune``), or "auto": both, when there are at most
    ``FINETUNE_MAX_TEXTS`` training texts (else frozen), keeping whichever measures
    better on the evaluation texts. The new version becomes the task's active one only
    if it beats the active version on the same evaluation texts.

    Side effects: writes ``MODELS_DIR/<task>/v<N>/`` (``head.npz``, and the encoder's
    weights when fine-tuned) and the ModelVersion row.

    Raises:
        heads.UnknownTask: no such task.
        heads.DataError: a split is missing or malformed, or training and evaluation
            splits overlap.
        ValueError: an unknown method.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: one of {', '.join(METHODS)}")
    the_task = heads.task(task_name)
    chosen, default_eval = heads.default_splits(data) if not splits else (list(splits), None)
    eval_split = eval_split or default_eval
    if eval_split is not None and eval_split in chosen:
        raise heads.DataError(f"the evaluation split {eval_split!r} is also a training split")
    texts: list[str] = []
    labels: list[int] = []
    sizes = {}
    for split in chosen:
        split_texts, split_labels = heads.read_split(data, split, the_task)
        texts += split_texts
        labels += split_labels
        sizes[split] = len(split_texts)
    if eval_split is not None:
        eval_texts, eval_labels = heads.read_split(data, eval_split, the_task)
        train_texts, train_labels = texts, labels
        eval_name = eval_split
    else:
        mask = heads.holdout(labels)
        train_texts = [t for t, held in zip(texts, mask, strict=True) if not held]
        train_labels = [y for y, held in zip(labels, mask, strict=True) if not held]
        eval_texts = [t for t, held in zip(texts, mask, strict=True) if held]
        eval_labels = [y for y, held in zip(labels, mask, strict=True) if held]
        eval_name = f"20% held out of {','.join(chosen)}"
    candidates: list[tuple[str, dict[str, Any], heads.Head, Any]] = []
    if method in ("auto", "frozen") or not train_texts:
        vectors = embed_all([*train_texts, *eval_texts], embed_progress)
        head, scores = heads.fit(
            the_task,
            vectors[: len(train_texts)],
            train_labels,
            vectors[len(train_texts) :],
            eval_labels,
            progress=note,
        )
        candidates.append(("frozen", scores, head, None))
    if method == "finetune" or (method == "auto" and len(train_texts) <= FINETUNE_MAX_TEXTS):
        model, head = finetune(
            the_task, train_texts, train_labels, epochs=epochs, progress=train_progress
        )
        # Served as it will be (the CPU's default dtype, fp16 on CUDA); the fp32 weights are saved.
        tuned = encoder.Encoder(model=copy.deepcopy(model))
        predicted = head.predict(tuned.embed(eval_texts)).tolist()
        scores = heads.metrics(the_task, eval_labels, predicted)
        if note is not None:
            note(f"fine-tuned, {epochs} epochs: {the_task.metric} {scores[the_task.metric]}")
        candidates.append(("finetune", scores, head, model))
    method_scores = {name: scores[the_task.metric] for name, scores, _, _ in candidates}
    kept, scores, head, model = max(candidates, key=lambda c: c[1][the_task.metric])
    staging = Path(settings.MODELS_DIR) / the_task.name / f".staging-{uuid.uuid4().hex}"
    head.save(staging / "head.npz")
    if model is not None:
        model.save_pretrained(staging, safe_serialization=True)
    digest = artefact_digest(staging)
    with transaction.atomic():
        # One registration per task at a time: the version number and its folder.
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))", [f"ml-head:{the_task.name}"]
            )
        active = ModelVersion.objects.filter(task=the_task.name, active=True).first()
        previous_score = None
        if active is not None:
            try:
                previous = heads.metrics(
                    the_task, eval_labels, _served(active).predict(eval_texts).tolist()
                )
                previous_score = previous[the_task.metric]
            except (OSError, ValueError) as exc:
                log.warning("ml.active_head_unreadable", version=active.id, error=str(exc))
        number = (
            ModelVersion.objects.filter(task=the_task.name).aggregate(n=Max("version"))["n"] or 0
        ) + 1
        relative = f"{the_task.name}/v{number}"
        target = Path(settings.MODELS_DIR) / relative
        if target.exists():
            # Left by a registration whose transaction rolled back (no row names it), or
            # another database's: kept aside, never deleted.
            aside = target.with_name(f".orphan-{target.name}-{uuid.uuid4().hex[:8]}")
            log.warning("ml.orphaned_artefact_moved", path=str(target), to=str(aside))
            target.rename(aside)
        staging.rename(target)
        promoted = previous_score is None or scores[the_task.metric] > previous_score
        if promoted and active is not None:
            ModelVersion.objects.filter(id=active.id).update(active=False)
        version = ModelVersion.objects.create(
            task=the_task.name,
            name=f"{the_task.name}-minilm-{'finetuned' if kept == 'finetune' else 'logreg'}",
            version=number,
            metrics={
                "metric": the_task.metric,
                "eval_split": eval_name,
                "eval_n": len(eval_texts),
                **scores,
                "methods": method_scores,
                "previous_active_score": previous_score,
            },
            trained_on={
                "data": data.name or str(data),
                "splits": sizes,
                "n": len(train_texts),
                "encoder": heads.ENCODER_NAME,
                "method": kept,
                "epochs": epochs if kept == "finetune" else None,
            },
            artefact=relative,
            sha256=digest,
            active=promoted,
        )
    log.info(
        "ml.head_trained",
        task=the_task.name,
        version=number,
        method=kept,
        score=scores[the_task.metric],
        previous=previous_score,
        promoted=promoted,
    )
    return TrainingOutcome(
        version=version,
        previous_score=previous_score,
        promoted=promoted,
        method_scores=method_scores,
    )


def artefact_digest(folder: Path) -> str:
    """SHA-256 over the files of an artefact folder, by name."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def evaluate(task_name: str, data: Path, split: str) -> dict[str, Any]:
    """Scores of the task's active head on ``data``'s ``split``: ``task``, ``split``,
    ``n``, the task's metric, ``per_class`` and ``model_version`` ("name vN").

    Raises:
        heads.UnknownTask, heads.DataError, NoTrainedModel.
    """
    the_task = heads.task(task_name)
    texts, labels = heads.read_split(data, split, the_task)
    version, served = active_model(the_task.name)
    scores = heads.metrics(the_task, labels, served.predict(texts).tolist())
    return {
        "task": the_task.name,
        "split": split,
        "n": len(texts),
        the_task.metric: scores[the_task.metric],
        "per_class": scores["per_class"],
        "model_version": f"{version.name} v{version.version}",
    }


@dataclass(frozen=True)
class ServedModel:
    """A version ready to predict: its head, and its own encoder when fine-tuned (None:
    the shared one)."""

    head: heads.Head
    encoder: encoder.Encoder | None

    def vectors(self, texts: Sequence[str]) -> np.ndarray:
        """Sentence vectors of ``texts`` from this version's encoder, (n, 384)."""
        if self.encoder is not None:
            return self.encoder.embed(texts)
        return encoder.get_encoder().embed(texts)

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """(n,) label ids."""
        return self.head.predict(self.vectors(texts))


_served_models: dict[int, ServedModel] = {}
_served_lock = threading.Lock()


def _served(version: ModelVersion) -> ServedModel:
    with _served_lock:
        served = _served_models.get(version.id)
        if served is None:
            folder = Path(settings.MODELS_DIR) / version.artefact
            head = heads.Head.load(folder / "head.npz")
            tuned = (
                encoder.Encoder(model_path=folder)
                if (folder / "model.safetensors").is_file()
                else None
            )
            served = _served_models[version.id] = ServedModel(head=head, encoder=tuned)
        return served


def active_model(task_name: str) -> tuple[ModelVersion, ServedModel]:
    """The task's active version, ready to predict (loaded once per process).

    Raises:
        heads.UnknownTask: no such task.
        NoTrainedModel: no active version, or its artefact is missing.
    """
    the_task = heads.task(task_name)
    version = ModelVersion.objects.filter(task=the_task.name, active=True).first()
    if version is None:
        raise NoTrainedModel(
            f"no trained {the_task.name} model: run `manage.py train {the_task.name} --data DIR`"
        )
    try:
        return version, _served(version)
    except FileNotFoundError as exc:
        raise NoTrainedModel(
            f"the artefact of {version} is missing ({exc.filename}): train it again"
        ) from exc


@dataclass(frozen=True)
class Verdicts:
    """The active head of ``task`` on a list of texts: ``probabilities`` (n, labels), in
    the order of ``labels``, from the version called ``model`` ("name vN")."""

    task: str
    labels: tuple[str, ...]
    probabilities: np.ndarray
    model: str

    def verdict(self, i: int) -> tuple[str, dict[str, float]]:
        """Text ``i``'s most probable label and its probabilities by label (4 decimals)."""
        row = self.probabilities[i]
        scores = {label: round(float(p), 4) for label, p in zip(self.labels, row, strict=True)}
        return self.labels[int(row.argmax())], scores


def verdicts(
    task_name: str, texts: Sequence[str], vectors: dict[int, np.ndarray] | None = None
) -> Verdicts:
    """The task's active head applied to ``texts`` (embedded with its encoder).

    ``vectors``: a cache of sentence vectors of these same ``texts`` by encoder, shared
    between calls so that heads on one encoder embed the texts once (filled here).

    Raises:
        heads.UnknownTask: no such task.
        NoTrainedModel: the task has no active head (see ``active_model``).
    """
    version, served = active_model(task_name)
    if not len(texts):
        probabilities = np.zeros((0, len(served.head.labels)), dtype=np.float32)
    else:
        cache = {} if vectors is None else vectors
        key = id(served.encoder)
        if key not in cache:
            cache[key] = served.vectors(texts)
        probabilities = served.head.probabilities(cache[key])
    return Verdicts(
        task=task_name,
        labels=served.head.labels,
        probabilities=probabilities,
        model=f"{version.name} v{version.version}",
    )
