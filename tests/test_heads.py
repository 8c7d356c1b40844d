"""Classifier heads end to end: ``manage.py train`` and ``evaluate`` on a tiny generated
data set in TweetEval's layout, ``facade.classify``, promotion, errors, ``/api/models/``.
Everything on the CPU, in seconds."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from mlengine import facade
from mlengine.inference import heads
from mlengine.models import ModelVersion
from tests.factories import make_personas
from tests.test_api import client_for

pytestmark = pytest.mark.django_db

WORDS = {
    0: ["awful", "terrible delay", "worst service", "hate this", "rude staff", "lost my bag"],
    1: ["departs at noon", "gate number", "the schedule", "flight number", "arrives", "terminal"],
    2: ["wonderful crew", "love this", "great seats", "thank you so much", "amazing", "best"],
}


def write_generated_split(folder: Path, split: str, per_label: int, offset: int = 0) -> None:
    """A split of generated posts in TweetEval's layout: ``per_label`` of each
    sentiment label."""
    texts, labels = [], []
    for label, phrases in WORDS.items():
        for i in range(per_label):
            phrase = phrases[(i + offset) % len(phrases)]
            texts.append(f"@airline {phrase} on flight {100 + i + offset}")
            labels.append(str(label))
    (folder / f"{split}_text.txt").write_text("\n".join(texts) + "\n")
    (folder / f"{split}_labels.txt").write_text("\n".join(labels) + "\n")


@pytest.fixture(autouse=True)
def models_dir(settings, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    settings.MODELS_DIR = tmp_path / "models"
    return settings.MODELS_DIR


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "sentiment"
    folder.mkdir()
    write_generated_split(folder, "train", 12)
    write_generated_split(folder, "val", 4, offset=3)
    write_generated_split(folder, "test", 4, offset=5)
    return folder


def _train(data: Path, *args: str) -> str:
    out = io.StringIO()
    call_command("train", "sentiment", "--data", str(data), *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_train_registers_an_active_version_and_evaluate_scores_it(
    data: Path, tmp_path: Path, models_dir: Path
) -> None:
    printed = _train(data, "--method", "frozen")

    version = ModelVersion.objects.get()
    assert version.active and version.version == 1 and version.task == "sentiment"
    assert version.trained_on["splits"] == {"train": 36}  # never the test split
    assert version.metrics["eval_split"] == "val" and version.metrics["eval_n"] == 12
    assert (models_dir / version.artefact / "head.npz").is_file()
    assert "active: it is the first model of this task" in printed

    out = tmp_path / "eval.json"
    call_command(
        "evaluate",
        "sentiment",
        "--data",
        str(data),
        "--split",
        "test",
        "--json",
        str(out),
        stdout=io.StringIO(),
    )
    result = json.loads(out.read_text())
    assert result["task"] == "sentiment" and result["split"] == "test" and result["n"] == 12
    assert result["model_version"] == "sentiment-minilm-logreg v1"
    assert set(result["per_class"]) == {"negative", "neutral", "positive"}
    assert result["macro_recall"] >= 0.9  # the generated labels are easy


def test_classify_gives_labels_probabilities_and_the_version(data: Path) -> None:
    _train(data, "--method", "frozen")

    good, bad = facade.classify("sentiment", ["love this wonderful crew", "awful rude staff"])

    assert good.label == "positive" and bad.label == "negative"
    assert set(good.probabilities) == {"negative", "neutral", "positive"}
    assert sum(good.probabilities.values()) == pytest.approx(1.0, abs=1e-3)
    assert good.model_version == "sentiment-minilm-logreg v1"
    assert facade.classify("sentiment", []) == []


def test_a_fine_tuned_version_is_kept_only_if_it_beats_the_active_one(
    data: Path, models_dir: Path
) -> None:
    _train(data, "--method", "frozen")
    first = ModelVersion.objects.get()

    printed = _train(data, "--method", "finetune", "--epochs", "1")

    second = ModelVersion.objects.get(version=2)
    assert second.trained_on["method"] == "finetune"
    assert (models_dir / second.artefact / "model.safetensors").is_file()
    previous = second.metrics["previous_active_score"]
    assert previous is not None
    beats = second.metrics["macro_recall"] > previous
    first.refresh_from_db()
    assert second.active is beats and first.active is not beats
    assert ModelVersion.objects.filter(active=True).count() == 1
    assert ("beats the previous active" in printed) is beats
    # The active version serves, whichever it is.
    assert facade.classify("sentiment", ["amazing"])[0].model_version.endswith(
        f"v{2 if beats else 1}"
    )


def test_errors_are_clear(data: Path, tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="unknown task 'mood'"):
        call_command("train", "mood", "--data", str(data))
    with pytest.raises(CommandError, match="no split 'nope'"):
        _train(data, "--splits", "nope")
    with pytest.raises(CommandError, match="also a training split"):
        _train(data, "--splits", "train", "--eval-split", "train")
    with pytest.raises(CommandError, match=r"manage\.py train sentiment"):
        call_command("evaluate", "sentiment", "--data", str(data), "--split", "test")
    with pytest.raises(facade.NoTrainedModel):
        facade.classify("emotion", ["hi"])
    with pytest.raises(facade.UnknownTask):
        facade.classify("mood", ["hi"])

    one_class = tmp_path / "one_class"
    one_class.mkdir()
    (one_class / "train_text.txt").write_text("a\nb\nc\nd\ne\n")
    (one_class / "train_labels.txt").write_text("0\n0\n0\n0\n0\n")
    with pytest.raises(CommandError, match="class"):
        _train(one_class, "--method", "frozen")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train_text.txt").write_text("a\nb\n")
    (broken / "train_labels.txt").write_text("0\n7\n")
    with pytest.raises(heads.DataError, match=r"label 7 is not one of 0\.\.2"):
        heads.read_split(broken, "train", heads.task("sentiment"))
    (broken / "train_labels.txt").write_text("0\n")
    with pytest.raises(heads.DataError, match="2 texts but 1 labels"):
        heads.read_split(broken, "train", heads.task("sentiment"))


def test_default_splits_never_train_on_a_test_split(tmp_path: Path) -> None:
    for split in ("val", "test_public"):
        write_generated_split(tmp_path, split, 2)
    assert heads.default_splits(tmp_path) == (["val"], None)
    write_generated_split(tmp_path, "train", 2)
    assert heads.default_splits(tmp_path) == (["train"], "val")

    only_test = tmp_path / "only_test"
    only_test.mkdir()
    write_generated_split(only_test, "test", 2)
    with pytest.raises(heads.DataError, match="never used"):
        heads.default_splits(only_test)


def test_models_api_lists_versions_read_only_for_signed_in_users(data: Path) -> None:
    _train(data, "--method", "frozen")
    personas = make_personas()
    client = client_for(personas.member)

    listing = client.get("/api/models/").json()

    (row,) = listing["results"]
    assert row["task"] == "sentiment" and row["active"] is True and row["version"] == 1
    assert row["metrics"]["macro_recall"] >= 0.9 and row["trained_on"]["splits"] == {"train": 36}
    assert client.get("/api/models/", {"task": "emotion"}).json()["results"] == []
    assert client.get("/api/models/", {"task": "mood"}).status_code == 400
    assert client.get("/api/models/", {"colour": "red"}).status_code == 400
    assert client.post("/api/models/", {"task": "sentiment"}).status_code == 405
    assert client.delete(f"/api/models/{row['id']}/").status_code == 405
    assert APIClient().get("/api/models/").status_code == 401
