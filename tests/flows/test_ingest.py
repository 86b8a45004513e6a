"""The ``ingest`` flow end to end over loopback HTTP: accounting, injected faults, incremental re-runs.

One served folder of 520 synthetic shapes images plus odd images; the tests
run in file order on one dataset root and each checks what a re-run did.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

N_CLEAN = 500
SHARD = 100


def _add_odd_images(folder: Path) -> None:
    extra = folder / "extra"
    extra.mkdir()
    Image.new("RGB", (200, 60), (200, 40, 40)).save(extra / "wide.png")  # aspect 3.3
    Image.new("RGB", (20, 20), (40, 200, 40)).save(extra / "tiny.png")  # below min side
    original = Image.open(folder / "images" / _shape_files(folder)[3].split("/")[-1]).convert("RGB")
    original.save(extra / "near.jpg", quality=70)  # a re-encoded near duplicate of clean row 3


def _shape_files(folder: Path) -> list[str]:
    return pq.read_table(folder / "shapes.parquet", columns=["file"]).column("file").to_pylist()


def _captions(folder: Path) -> list[str]:
    return pq.read_table(folder / "shapes.parquet", columns=["caption"]).column("caption").to_pylist()


# (path on the server, caption, expected download status, expected filter outcome / reject reason)
def _fault_rows(files: list[str], captions: list[str]) -> list[tuple[str, str | None, str, str | None]]:
    spare = files[N_CLEAN:]
    return [
        (f"_fault/404/{spare[0]}", captions[N_CLEAN], "failed_to_download", None),
        (f"_fault/500/{spare[1]}", captions[N_CLEAN + 1], "failed_to_download", None),
        (f"_fault/stall/{spare[2]}", captions[N_CLEAN + 2], "failed_to_download", None),
        (f"_fault/html/{spare[3]}", captions[N_CLEAN + 3], "failed_to_resize", None),
        (f"_fault/truncate/{spare[4]}", captions[N_CLEAN + 4], "failed_to_resize", None),
        (f"{files[7]}?mirror=1", "the same picture under another address", "success", "exact_duplicate"),
        ("extra/near.jpg", "a re-encoded copy", "success", "near_duplicate"),
        ("extra/wide.png", "a very wide red banner", "success", "aspect_ratio"),
        ("extra/tiny.png", "a tiny green square icon", "success", "too_small"),
        (spare[5], "", "success", "caption_empty"),
        (spare[6], "stock photo", "success", "caption_boilerplate"),
        (spare[7], captions[N_CLEAN + 7], "success", "kept"),
    ]


@pytest.fixture(scope="module")
def served(tmp_path_factory, prefect_harness):
    from dalle_lightning.serving.image_server import ImageServer, write_url_list
    from dalle_lightning.synth.shapes_dataset import ShapesConfig, write_shapes_dataset

    folder = tmp_path_factory.mktemp("served")
    write_shapes_dataset(str(folder), ShapesConfig(n=N_CLEAN + 20, size=64, seed=1))
    _add_odd_images(folder)
    files, captions = _shape_files(folder), _captions(folder)
    faults = _fault_rows(files, captions)
    with ImageServer(folder, stall_seconds=20) as server:
        urls = folder / "urls.parquet"
        rows = [(f, c) for f, c in zip(files[:N_CLEAN], captions[:N_CLEAN], strict=False)] + [
            (f, c) for f, c, _, _ in faults
        ]
        write_url_list(server, [f for f, _ in rows], [c for _, c in rows], str(urls))
        yield {
            "server": server,
            "folder": folder,
            "urls": urls,
            "rows": rows,
            "faults": {server.url_for(f): (s, r) for f, _, s, r in faults},
            "root": tmp_path_factory.mktemp("root"),
        }


def _ingest(served, urls=None, **settings):
    from dalle_lightning.stages.download import DownloadConfig
    from dalle_lightning.stages.filter import FilterConfig
    from flows.ingest import run_ingest

    return run_ingest(
        str(served["root"]),
        n_workers=2,
        name="t",
        urls=[str(urls or served["urls"])],
        shard_size=SHARD,
        download=DownloadConfig(timeout=6, thread_count=16),
        filter=FilterConfig(**settings),
    )


def _read_all(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("part-*.parquet"))])


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_first_ingest_accounts_for_every_row(served):
    summary = _ingest(served)
    root = Path(served["root"])
    n_input = len(served["rows"])
    assert summary["input"] == n_input
    assert summary["downloaded"] + summary["failed"] == n_input
    assert summary["kept"] + summary["rejected"] == summary["downloaded"]

    downloaded = _read_all(root / "download" / "t")
    assert downloaded.num_rows == n_input
    assert sorted(downloaded.column("url").to_pylist()) == sorted(
        served["server"].url_for(f) for f, _ in served["rows"]
    )
    kept = _read_all(root / "filter" / "t")
    rejects = _read_all(root / "filter" / "t" / "rejects")
    assert (
        kept.num_rows + rejects.num_rows == pc.sum(pc.equal(downloaded.column("status"), "success")).as_py()
    )
    assert not set(kept.column("key").to_pylist()) & set(rejects.column("key").to_pylist())

    status = dict(
        zip(downloaded.column("url").to_pylist(), downloaded.column("status").to_pylist(), strict=False)
    )
    errors = dict(
        zip(
            downloaded.column("url").to_pylist(), downloaded.column("error_message").to_pylist(), strict=False
        )
    )
    reasons = dict(
        zip(rejects.column("url").to_pylist(), rejects.column("reject_reason").to_pylist(), strict=False)
    )
    kept_urls = set(kept.column("url").to_pylist())
    for url, (want_status, want_outcome) in served["faults"].items():
        assert status[url] == want_status, (url, status[url], errors[url])
        if want_outcome == "kept":
            assert url in kept_urls, (url, reasons.get(url))
        elif want_outcome is not None:
            assert reasons.get(url) == want_outcome, (url, reasons.get(url))
    assert "404" in errors[next(u for u in served["faults"] if "/404/" in u)]
    assert "500" in errors[next(u for u in served["faults"] if "/500/" in u)]
    assert "timed out" in errors[next(u for u in served["faults"] if "/stall/" in u)].lower()
    # the clean synthetic rows are almost all kept (no false duplicates)
    clean_rejected = sum(1 for u, r in reasons.items() if u not in served["faults"])
    assert clean_rejected <= N_CLEAN * 0.02, clean_rejected
    assert summary["work"]["download"] == {"executed": 6}


def test_mlflow_has_parent_and_stage_runs(served):
    import os

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("dalle-lightning")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parent = next(r for r in runs if r.info.run_name == "ingest-t")
    children = {
        r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == {"download", "filter"}
    download, filter_ = children["download"], children["filter"]
    assert download.data.metrics["input"] == len(served["rows"])
    assert download.data.metrics["failed.failed-to-download"] == 3
    assert download.data.params["download.timeout"] == "6"
    assert filter_.data.metrics["rejected.exact-duplicate"] >= 1
    assert filter_.data.tags["dalle.fingerprint.input"] == download.data.tags["dalle.fingerprint.output"]
    assert [i.dataset.name for i in download.inputs.dataset_inputs] == ["sources/t", "download/t"]


def test_every_written_file_validates(served):
    from dalle_lightning.datasets.verify import verify_tree

    report = verify_tree(str(served["root"]))
    assert report.ok, report.problems
    assert report.checked >= 6 * 4  # sources, download, filter, rejects (+ hashes)


def test_rerun_with_nothing_changed_does_no_shard_work(served):
    root = Path(served["root"])
    before = _snapshot(root)
    summary = _ingest(served)
    for stage, work in summary["work"].items():
        assert set(work) == {"cached"}, (stage, work)
    assert _snapshot(root) == before  # manifests and files untouched


def test_changing_a_filter_setting_reruns_filter_not_download(served):
    summary = _ingest(served, max_caption_len=60)
    assert set(summary["work"]["download"]) == {"cached"}
    assert summary["work"]["filter-score"] == {"executed": 6}
    assert summary["rejected_by_reason"].get("caption_too_long", 0) > 0


def test_appending_urls_downloads_only_new_shards(served):
    from dalle_lightning.serving.image_server import write_url_list

    before = {p.name for p in (Path(served["root"]) / "download" / "t").glob("part-*.parquet")}
    folder = served["folder"]
    more = [(f"{f}?append={i}", f"appended copy {i}") for i, f in enumerate(_shape_files(folder)[:100])]
    urls = folder / "urls-appended.parquet"
    rows = served["rows"] + more
    write_url_list(served["server"], [f for f, _ in rows], [c for _, c in rows], str(urls))
    summary = _ingest(served, urls=urls, max_caption_len=60)
    after = {p.name for p in (Path(served["root"]) / "download" / "t").glob("part-*.parquet")}
    new = after - before
    assert len(new) == 2, (
        sorted(before),
        sorted(after),
    )  # the old partial last shard is replaced, one more added
    assert summary["work"]["download"] == {"cached": len(after) - len(new), "executed": len(new)}
    assert summary["input"] == len(rows)
    # the appended copies are exact duplicates of rows already kept: the old rows win
    # an appended copy is an exact duplicate of its original, unless the original was itself
    # rejected by a rule (its caption is now too long): then the copy, with a short caption, is kept
    # (or is a near duplicate of the re-encoded copy of row 3, which came earlier)
    rejects = _read_all(Path(served["root"]) / "filter" / "t" / "rejects")
    reasons = dict(
        zip(rejects.column("url").to_pylist(), rejects.column("reject_reason").to_pylist(), strict=True)
    )
    for url in (served["server"].url_for(f) for f, _ in more):
        original = url.split("?")[0]
        expected = "caption_too_long" if reasons.get(original) == "caption_too_long" else "exact_duplicate"
        if expected == "exact_duplicate":
            assert reasons.get(url) == "exact_duplicate", (url, reasons.get(url), reasons.get(original))
        else:
            assert reasons.get(url) in (None, "near_duplicate"), (url, reasons.get(url))


def test_deleting_prefect_home_still_skips_finished_shards(served):
    import os

    root = Path(served["root"])
    before = _snapshot(root)
    shutil.rmtree(os.environ["PREFECT_HOME"], ignore_errors=True)
    summary = _ingest(served, urls=served["folder"] / "urls-appended.parquet", max_caption_len=60)
    for stage, work in summary["work"].items():
        assert "executed" not in work, (stage, work)
    assert set(summary["work"]["download"]) == {"skipped"}
    assert _snapshot(root) == before
