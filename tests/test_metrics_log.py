"""metrics.jsonl on object storage: uploaded whole, at most once per interval for step records,
at once for events and checkpoints (a local path stands in for the bucket)."""

import json

import ml_collections

from emo_jax.train import metrics


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_object_log_keeps_earlier_lines_and_uploads_at_most_once_per_interval(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}')  # an earlier run's file, cut before its newline
    log = metrics._ObjectLog(str(path), upload_every_s=3600)
    log.write('{"step": 1}\n')
    log.flush()  # the first upload of a run is immediate
    assert _steps(path) == [0, 1]
    log.write('{"step": 2}\n')
    log.flush()  # within the interval: kept in memory
    assert _steps(path) == [0, 1]
    log.upload()
    assert _steps(path) == [0, 1, 2]
    log.write('{"step": 3}\n')
    log.close()
    assert _steps(path) == [0, 1, 2, 3]


def test_writer_uploads_events_and_synced_records_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics.storage, "is_remote", lambda path: True)
    monkeypatch.setattr(metrics, "OBJECT_UPLOAD_EVERY_S", 3600.0)
    config = ml_collections.ConfigDict({"train": {"log_every": 1}})
    writer = metrics.MetricWriter(str(tmp_path), config, total_steps=10, start_step=0)
    writer.tb = None  # TensorBoard events are not under test
    path = tmp_path / "metrics.jsonl"
    writer.event(0, event="start")
    writer.write(1, {"loss": 1.0}, console=False)
    writer.write(2, {"loss": 0.9}, console=False)
    assert _steps(path) == [0]  # the event went up at once, the steps wait for the interval
    writer.sync()  # as the loop does with every checkpoint
    assert _steps(path) == [0, 1, 2]
    writer.write(3, {"loss": 0.8}, console=False)
    writer.event(3, event="done")
    assert _steps(path) == [0, 1, 2, 3, 3]
    writer.close()
