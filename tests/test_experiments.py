"""The experiments' data loaders and a smoke run of the CLI."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from experiments import data, run


def test_digits_splits_sizes_dtypes_and_standardization():
    splits = data.load_digits(seed=0)
    sizes = {k: len(v[1]) for k, v in splits.items()}
    assert sizes == {"train": 1297, "val": 250, "test": 250}
    x, y = splits["train"]
    assert x.shape == (1297, 1, 8, 8) and x.dtype == np.float32 and y.dtype == np.int32
    assert set(np.unique(y)) == set(range(10))
    assert np.abs(x.mean(0)).max() < 1e-4  # standardized with the training split's statistics
    flat = data.flatten(splits)
    assert flat["val"][0].shape == (250, 64)
    # A different seed shuffles differently; the same seed reproduces.
    assert not np.array_equal(data.load_digits(seed=1)["train"][1], y)
    np.testing.assert_array_equal(data.load_digits(seed=0)["train"][1], y)


def _write_cifar(root, per_batch=12, test=10, corrupt=None):
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test if name == "test_batch" else per_batch
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist(), "batch_label": name}
        with open(os.path.join(root, name), "wb") as f:
            if name == corrupt:
                f.write(b"not a pickle")
            else:
                pickle.dump(batch, f)
    return names


def test_cifar10_loader_round_trip_with_cs231n_preprocessing(tmp_path):
    root = str(tmp_path / "cifar-10-batches-py")
    _write_cifar(root)
    splits = data.load_cifar10(root, num_training=50, num_validation=10, num_test=8)
    (xt, yt), (xv, yv), (xs, ys) = splits["train"], splits["val"], splits["test"]
    assert xt.shape == (50, 3, 32, 32) and xv.shape == (10, 3, 32, 32) and xs.shape == (8, 3, 32, 32)
    assert xt.dtype == np.float32 and yt.dtype == np.int32
    with open(os.path.join(root, "data_batch_1"), "rb") as f:
        first = pickle.load(f)
    raw = first["data"].reshape(-1, 3, 32, 32).astype(np.float32)
    all_train = np.concatenate([pickle.load(open(os.path.join(root, f"data_batch_{i}"), "rb"))
                                ["data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)[:50]
    mean_image = all_train.astype(np.float32).mean(0)
    np.testing.assert_allclose(xt[:12], raw - mean_image, atol=1e-4)  # mean image subtracted
    np.testing.assert_array_equal(yt[:12], first["labels"])
    np.testing.assert_allclose(xt.mean(0), 0.0, atol=1e-3)


def test_cifar10_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*cifar10_dir="):
        data.load_cifar10(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="lacks the batches"):
        data.load_cifar10(str(empty))
    bad = str(tmp_path / "bad")
    _write_cifar(bad, corrupt="data_batch_3")
    with pytest.raises(ValueError, match="data_batch_3 is not a CIFAR-10 python batch"):
        data.load_cifar10(bad, num_training=50, num_validation=10, num_test=8)
    small = str(tmp_path / "small")
    _write_cifar(small)
    with pytest.raises(ValueError, match="holds 60 training"):
        data.load_cifar10(small)  # the default 49000 + 1000 split does not fit


def test_cli_reports_a_missing_cifar_directory(tmp_path, capsys):
    assert run.main(["--data", "cifar10", "--data-dir", str(tmp_path / "x"),
                     "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_quick_smoke_run_writes_png_json_and_report(tmp_path):
    out = tmp_path / "results"
    assert run.main(["--quick", "--only", "dropout", "--no-progress", "--out", str(out)]) == 0
    png = out / "dropout.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    res = json.loads((out / "dropout.json").read_text())
    assert set(res["runs"]) == {"0.0", "0.75"}
    assert len(res["runs"]["0.75"]["val_acc"]) == res["config"]["epochs"]
    report = (out / "REPORT.md").read_text()
    assert "![dropout](dropout.png)" in report
    # The findings quote the JSON's numbers.
    final_val = res["runs"]["0.75"]["val_acc"][-1]
    assert f"{final_val:.3f}" in report


def test_benchmark_quick_writes_a_table_and_json(tmp_path, capsys):
    from experiments import benchmark

    result = benchmark.main(["--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "batch norm, forward + backward" in printed and "dropout" in printed
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    assert "bound/ours" in printed and "% of" not in printed
    for row in saved["batch_norm"]:
        assert {"native", "alt", "graph", "autodiff", "naive"} <= set(row["seconds"])
        # --quick shapes fit in cache: no "bound" that is not one, and the table says why.
        assert row["x_bytes"] < benchmark.MIN_BOUND_BYTES and row["bound_seconds"] is None
        assert "in cache" in printed
        # The hand-written rule keeps one input-sized array plus per-feature vectors.
        assert row["residual_bytes"]["alt"] <= 1.05 * row["x_bytes"]
        assert row["residual_bytes"]["native"] <= 1.05 * row["x_bytes"]
    # The sharded row: x split over 8 devices, never gathered, on either rule.
    assert len(saved["sharded"]["seconds"]) == 4
    assert not any(saved["sharded"]["all_gathers"].values()), saved["sharded"]
    for row in saved["dropout"]:
        elements = row["x_bytes"] / 4
        assert row["residual_bytes"]["jaxbn (packed mask)"] <= elements / 8 + 16
    # The adapters' batch norm keeps one x-sized array; each framework's own layer keeps more.
    assert {r["framework"] for r in saved["adapters"]} == {"flax.nnx", "flax.linen", "equinox"}
    assert "framework adapters" in printed
    for row in saved["adapters"]:
        res = row["residual_bytes"]
        assert res["jaxbn"] <= 1.05 * row["x_bytes"] < 1.5 * row["x_bytes"] <= res["framework"]


def test_report_formats_settings_for_people():
    from experiments.report import format_value

    assert format_value(10 ** -3.5) == "3.2e-4"
    assert format_value(1e-3) == "1e-3"
    assert format_value(5e-4) == "5e-4"
    assert format_value(0.75) == "0.75" and format_value(0.02) == "0.02"
    assert format_value([0.0, 0.75]) == "[0, 0.75]" and format_value(50) == "50"


def _bn_vs_baseline_result(first_bn, first_none, num_train, batch_size):
    run = lambda first: {"loss": [2.0] * 4, "train_acc": [first, 0.9], "val_acc": [first, 0.9]}
    return {"config": {"num_train": num_train, "batch_size": batch_size, "epochs": 2},
            "runs": {"none": run(first_none), "batchnorm": run(first_bn),
                     "layernorm": run(0.5)}}


def test_report_explains_the_running_statistics_from_the_numbers():
    from experiments.report import summarize_bn_vs_baseline

    # 6 steps at momentum 0.9: 0.9^6 = 53% of the initial value is left, and dominates.
    _, findings = summarize_bn_vs_baseline(_bn_vs_baseline_result(0.10, 0.095, 300, 50))
    text = " ".join(findings)
    assert "no clear early advantage" in text and "6 steps at momentum 0.9" in text
    assert "still 53% initial value" in text and "dominates" in text
    assert "close to their initial values" not in text
    # 20 steps: 12% left; the explanation says what the rest is instead.
    _, findings = summarize_bn_vs_baseline(_bn_vs_baseline_result(0.10, 0.095, 1000, 50))
    assert "still 12% initial value" in " ".join(findings)
    assert "dominates" not in " ".join(findings)
    _, findings = summarize_bn_vs_baseline(_bn_vs_baseline_result(0.40, 0.10, 1000, 50))
    assert "faster early progress with batch norm" in " ".join(findings)
