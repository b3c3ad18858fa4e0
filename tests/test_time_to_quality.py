"""bench.time_to_quality: first epoch at a target, seconds to it, a curve read from a plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import time_to_quality as ttq


def write_metrics(run: Path, epochs: list[tuple[float, float, float]]) -> None:
    """A run folder's metrics.jsonl as the trainer writes it: (train_s, eval_s, valid NDCG@20)
    per epoch, a loss row between, the k-means start at step 0."""
    run.mkdir(parents=True)
    rows: list[dict[str, float]] = [{"step": 0, "time/kmeans_start_s": 4.0}]
    for epoch, (train_s, eval_s, valid) in enumerate(epochs):
        step = 10 * (epoch + 1)
        rows += [
            {"step": step - 5, "loss/total": 1.0},
            {"step": step, "train/epoch": epoch, "time/clustering_s": 0.0, "time/train_s": train_s},
            {"step": step, "valid/NDCG@20": valid, "time/eval_s": eval_s},
        ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_first_epoch_at_target_and_the_seconds_to_it(tmp_path: Path) -> None:
    write_metrics(tmp_path / "run", [(10.0, 1.0, 0.02), (12.0, 1.0, 0.05), (11.0, 2.0, 0.07),
                                     (10.0, 1.0, 0.06)])
    curve = ttq.run_curve("opt", tmp_path / "run")
    assert curve.epochs == (0, 1, 2, 3)
    assert curve.seconds == (15.0, 28.0, 41.0, 52.0)  # 4 + 10 + 1, + 12 + 1, + 11 + 2, + 10 + 1
    got = ttq.report(curve, 0.0632)
    assert got["first_epoch_at_target"] == 2 and got["seconds_to_target"] == 41.0
    assert got["best"] == 0.07 and got["best_epoch"] == 2
    assert ttq.report(curve, 0.08)["first_epoch_at_target"] is None


def test_a_curve_is_read_back_from_its_plot(tmp_path: Path) -> None:
    """A line drawn at known pixel rows, two pixels thick, in the harness's colour: each epoch's
    value is the mean row of its column, mapped through the two ticks of each axis."""
    from PIL import Image

    image = Image.new("RGB", (300, 200), "white")
    values = [0.01 * e for e in range(6)]  # epochs 0..5, x = 100 + 20 e, y = 180 - 2000 v
    for epoch, value in enumerate(values):
        for x in range(100 + 20 * epoch - 10, 100 + 20 * epoch + 10):
            y = round(180 - 2000 * value)
            image.putpixel((x, y), ttq.LINE_RGB)
            image.putpixel((x, y - 1), ttq.LINE_RGB)
    png = tmp_path / "curve.png"
    image.save(png)
    got = ttq.digitise(png, x_pixels=(100, 200), x_values=(0, 5), y_pixels=(180, 80),
                       y_values=(0.0, 0.05), epochs=6)
    # the line's two rows y and y - 1 average to y - 0.5: half a pixel, 0.00025 in value
    assert [e for e, _ in got] == list(range(6))
    assert [v for _, v in got] == pytest.approx([v + 0.00025 for v in values], abs=1e-12)


def test_names_and_paths_are_checked() -> None:
    with pytest.raises(SystemExit):
        ttq.main(["--target", "0.06"])  # no curve
    with pytest.raises(SystemExit):
        ttq.main(["--run", "no-equals-sign"])
