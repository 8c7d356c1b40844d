"""Virality at posting time (``mlengine.inference.virality_features``,
``virality_model``, ``virality_training``): the label rule, features from predecessors
only, the tree artefact, scoring, and ``train``/``evaluate virality``."""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from mlengine.inference import virality_features, virality_model
from mlengine.inference.virality_features import Post
from mlengine.models import ModelVersion

ORIGIN = datetime(2020, 1, 1, tzinfo=UTC)


def _post(i: int, retweets: int | None, *, hours: float | None = None, text: str = "") -> Post:
    return Post(
        author="a",
        created_at=ORIGIN + timedelta(hours=i if hours is None else hours),
        text=text or f"post number {i}",
        retweet_count=retweets,
        favorite_count=None if retweets is None else 3 * retweets,
        key=f"{i:06d}",
    )


def _history(n: int, seed: int = 1) -> list[Post]:
    rng = random.Random(seed)
    return [_post(i, rng.randint(50, 150)) for i in range(n)]


def test_a_post_is_viral_at_twice_the_median_of_its_previous_100() -> None:
    history = [_post(i, i + 1) for i in range(100)]  # median 50.5: viral from 101
    at, above, below = _post(100, 101), _post(101, 101), _post(100, 100)

    assert virality_features.labels([at], {"a": [*history, at]}).tolist() == [1]
    assert virality_features.labels([below], {"a": [*history, below]}).tolist() == [0]
    # The 101st post has 101 predecessors, the last 100 of which (2..101) have median 51.5.
    assert virality_features.labels([above], {"a": [*history, at, above]}).tolist() == [0]


def test_only_the_latest_100_predecessors_set_the_median() -> None:
    old = [_post(i, 1000) for i in range(50)]
    recent = [_post(50 + i, 10) for i in range(100)]
    post = _post(150, 20)

    assert virality_features.labels([post], {"a": [*old, *recent]}).tolist() == [1]


def test_posts_with_fewer_than_100_predecessors_are_not_scored() -> None:
    history = _history(99)
    post = _post(99, 10_000)
    # One more post, at the very same time as the scored one: not a predecessor.
    same_time = _post(0, 5, hours=99)

    assert virality_features.labels([post], {"a": [*history, same_time]}).tolist() == [-1]
    rows, scored = virality_features.feature_rows([post], {"a": [*history, same_time]})
    assert scored.tolist() == [False] and np.isnan(rows).all()
    assert virality_features.labels([post], {"b": _history(300)}).tolist() == [-1]


def test_features_and_label_use_only_strictly_earlier_posts() -> None:
    history = _history(300)
    post = history[150]
    before_x, _ = virality_features.feature_rows([post], {"a": history})
    before_y = virality_features.labels([post], {"a": history})

    rng = random.Random(7)
    changed = history[:150] + [replace(p, retweet_count=10**6) for p in history[151:]]
    changed.append(replace(history[0], created_at=post.created_at, retweet_count=10**7, key="z"))
    rng.shuffle(changed)
    changed.insert(rng.randrange(len(changed)), post)
    after_x, scored = virality_features.feature_rows([post], {"a": changed})

    assert scored.tolist() == [True]
    np.testing.assert_array_equal(after_x, before_x)
    assert virality_features.labels([post], {"a": changed}).tolist() == before_y.tolist()
    # A predecessor's count does move them.
    earlier = [*history[:149], replace(history[149], retweet_count=10**6), *history[150:]]
    moved, _ = virality_features.feature_rows([post], {"a": earlier})
    assert not np.array_equal(moved, before_x, equal_nan=True)


def _fitted(
    seed: int = 0,
) -> tuple[virality_model.ViralityModel, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = 400
    rows = rng.normal(size=(n, len(virality_features.FEATURES)))
    rows[rng.random(rows.shape) < 0.1] = np.nan
    vectors = rng.normal(size=(n, 384)).astype(np.float32)
    y = ((np.nan_to_num(rows[:, 0]) + vectors[:, 0] + rng.normal(size=n)) > 0.5).astype(int)
    return virality_model.fit(rows, vectors, y), rows, vectors, y


def test_the_saved_trees_predict_as_scikit_learn_does(tmp_path: Path) -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier

    model, rows, vectors, y = _fitted()
    design = model.design(rows, vectors)
    reference = HistGradientBoostingClassifier(**virality_model.HYPER_PARAMETERS).fit(design, y)
    model.save(tmp_path / "model.npz")
    loaded = virality_model.ViralityModel.load(tmp_path / "model.npz", version="virality-hgb v9")

    expected = reference.predict_proba(design)[:, 1]
    np.testing.assert_allclose(model.probabilities(design), expected, rtol=1e-9)
    np.testing.assert_allclose(loaded.probabilities(design), expected, rtol=1e-9)
    assert loaded.feature_names == model.feature_names and loaded.version == "virality-hgb v9"


def test_score_posts_scores_each_post_from_its_own_history() -> None:
    model, _, _, _ = _fitted()
    model = replace(model, version="virality-hgb v3")
    history = _history(200)
    fresh = Post(author="a", created_at=ORIGIN + timedelta(hours=300), text="New! #big")
    newcomer = Post(author="b", created_at=ORIGIN + timedelta(hours=300), text="hello")
    early = replace(history[50], retweet_count=None)
    vectors = np.random.default_rng(1).normal(size=(3, 384)).astype(np.float32)

    scores = virality_model.score_posts(
        model, [fresh, newcomer, early], {"a": history, "b": history[:10]}, vectors
    )

    assert [s.model_version for s in scores] == ["virality-hgb v3"] * 3
    assert scores[1].score is None and scores[2].score is None
    assert scores[0].score is not None and 0.0 <= scores[0].score <= 1.0
    rows, _ = virality_features.feature_rows([fresh], {"a": history})
    expected = model.probabilities(model.design(rows, vectors[:1]))[0]
    assert scores[0].score == round(float(expected), 4)


@pytest.fixture
def models_dir(settings, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    settings.MODELS_DIR = tmp_path / "models"
    return settings.MODELS_DIR


COLUMNS = [
    "rownames",
    "source",
    "id_str",
    "text",
    "created_at",
    "retweet_count",
    "in_reply_to_user_id_str",
    "favorite_count",
    "is_retweet",
]


def _write_csv(path: Path, n: int = 700) -> Path:
    """One account posting every 6 hours; two posts in five are loud announcements that
    draw about four times the usual retweets."""
    rng = random.Random(3)
    cities = ["Ohio", "Iowa", "Texas", "Maine", "Utah", "Idaho", "Kansas"]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for i in range(n):
            loud = i % 5 in (0, 2)
            if loud:
                text = f"BIG ANNOUNCEMENT tomorrow!!! #Huge #Win {rng.choice(cities)} {i}"
                retweets = rng.randint(300, 500)
            else:
                text = f"Thank you {rng.choice(cities)} for a lovely evening, number {i}."
                retweets = rng.randint(80, 120)
            when = ORIGIN + timedelta(hours=6 * i)
            writer.writerow(
                [i + 1, "Twitter Web Client", 10**9 + i, text,
                 when.strftime("%Y-%m-%dT%H:%M:%SZ"), retweets, "", 3 * retweets, "FALSE"]
            )  # fmt: skip
    return path


def _command(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


@pytest.mark.django_db
def test_train_then_evaluate_on_a_time_split(models_dir: Path, tmp_path: Path) -> None:
    data = _write_csv(tmp_path / "posts.csv")
    cut = (ORIGIN + timedelta(hours=6 * 500)).date().isoformat()  # 2020-05-05

    first = _command("train", "virality", "--data", str(data), "--until", cut)
    again = _command("train", "virality", "--data", str(data), "--until", cut)
    report = tmp_path / "out.json"
    shown = _command(
        "evaluate", "virality", "--data", str(data), "--since", cut, "--json", str(report)
    )

    v1, v2 = ModelVersion.objects.filter(task="virality").order_by("version")
    assert "active: it is the first model" in first and v1.active and not v2.active
    assert "not active" in again  # same data, same score: the active one is kept
    assert v1.trained_on["n"] == 400 and v1.metrics["roc_auc"] >= 0.9
    assert (models_dir / v1.artefact / "model.npz").is_file()
    result = json.loads(report.read_text())
    assert set(result) == {"roc_auc", "n", "positives", "operating_points", "model_version"}
    assert result["n"] == 200 and result["positives"] == 80
    points = {p["min_score"]: p for p in result["operating_points"]}
    assert list(points) == [0.5, 0.6, 0.7, 0.8, 0.9]
    # Fewer alerts and no worse precision as the threshold rises (the model separates).
    alerts = [p["alerts"] for p in points.values()]
    assert alerts == sorted(alerts, reverse=True) and points[0.5]["alerts"] > 0
    assert points[0.5]["precision"] is not None and points[0.5]["precision"] > 80 / 200
    assert "min_score 0.5:" in shown
    assert result["roc_auc"] >= 0.9 and result["model_version"] == "virality-hgb v1"
    assert "roc_auc" in shown


@pytest.mark.django_db
def test_commands_report_bad_input_clearly(models_dir: Path, tmp_path: Path) -> None:
    data = _write_csv(tmp_path / "posts.csv", n=140)
    bad = tmp_path / "bad.csv"
    bad.write_text("id,words\n1,hello\n")
    broken = tmp_path / "broken.csv"
    broken.write_text("text,created_at,retweet_count\nhi,yesterday,3\n")

    with pytest.raises(CommandError, match="no such file"):
        _command("train", "virality", "--data", str(tmp_path / "none.csv"))
    with pytest.raises(CommandError, match="lacks the column"):
        _command("train", "virality", "--data", str(bad))
    with pytest.raises(CommandError, match="line 2: not a date"):
        _command("train", "virality", "--data", str(broken))
    with pytest.raises(CommandError, match="--until: not a date"):
        _command("train", "virality", "--data", str(data), "--until", "soon")
    with pytest.raises(CommandError, match="scored posts"):
        _command("train", "virality", "--data", str(data))
    with pytest.raises(CommandError, match="no trained virality model"):
        _command("evaluate", "virality", "--data", str(data))
    with pytest.raises(CommandError, match="--since: not a date"):
        _command("evaluate", "virality", "--data", str(data), "--since", "2020-13-01")


@pytest.mark.django_db
def test_the_public_account_clears_the_bar_on_2016(
    shared_data: Path, models_dir: Path, tmp_path: Path
) -> None:
    data = shared_data / "trump_tweets" / "trump_tweets_2009_2016.csv"
    report = tmp_path / "2016.json"

    _command("train", "virality", "--data", str(data), "--until", "2016-01-01")
    _command(
        "evaluate", "virality", "--data", str(data), "--since", "2016-01-01", "--json", str(report)
    )

    result = json.loads(report.read_text())
    assert result["n"] == 3428 and result["positives"] == 378
    assert result["roc_auc"] >= 0.78
