"""Registry aliases follow the best evaluated model version on one caption set (``flows.models_registry.promote``)."""

from __future__ import annotations

import pytest


@pytest.fixture
def versions(tmp_path):
    """Three registered versions of a throw-away model in a fresh SQLite store."""
    import mlflow

    from flows.models_registry import log_and_register

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    mlflow.set_experiment("promote")
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    found = []
    for _ in range(3):
        with mlflow.start_run():
            found.append(log_and_register(str(checkpoint), name="m", tags={})[1])
    yield found
    mlflow.set_tracking_uri(None)


def _alias(alias):
    import mlflow

    return mlflow.MlflowClient().get_model_version_by_alias("m", alias).version


def test_alias_moves_only_to_a_better_version(versions):
    from flows.models_registry import promote

    v1, v2, v3 = versions
    kw = {"metric": "clip_score_n1", "eval_set_fingerprint": "set-a", "aliases": ["candidate", "production"]}
    assert promote("m", v1, value=0.30, **kw) == ["candidate", "production"]
    assert promote("m", v2, value=0.25, **kw) == []  # worse: both stay on v1
    assert _alias("candidate") == v1
    assert promote("m", v3, value=0.35, **kw) == ["candidate", "production"]
    assert _alias("candidate") == v3 and _alias("production") == v3


def test_lower_is_better_for_fid_and_other_sets_are_not_compared(versions):
    from flows.models_registry import promote

    v1, v2, v3 = versions
    kw = {"metric": "fid", "aliases": ["candidate"]}
    assert promote("m", v1, value=10.0, eval_set_fingerprint="set-a", **kw) == ["candidate"]
    assert promote("m", v2, value=12.0, eval_set_fingerprint="set-a", **kw) == []
    assert promote("m", v3, value=8.0, eval_set_fingerprint="set-a", **kw) == ["candidate"]
    # a score on another caption set is not comparable: the alias follows the newest evaluation
    assert promote("m", v2, value=50.0, eval_set_fingerprint="set-b", **kw) == ["candidate"]
    assert _alias("candidate") == v2
