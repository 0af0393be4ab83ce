"""The experiments' data loaders and a smoke run of the CLI."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from experiments import data, findings, run


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
    assert xt.shape == (50, 3, 32, 32) and xv.shape == (10, 3, 32, 32)
    assert xs.shape == (8, 3, 32, 32) and yv.shape == (10,) and ys.shape == (8,)
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


@pytest.mark.slow
def test_quick_smoke_run_writes_png_json_and_report(tmp_path):
    out = tmp_path / "results"
    assert run.main(["--quick", "--only", "dropout", "--no-progress", "--out", str(out),
                     "--seed", "1", "--seeds", "3"]) == 0
    png = out / "dropout.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    res = json.loads((out / "dropout.json").read_text())
    assert res["seeds"] == [3, 4, 5]  # --seed 1 with 3 seeds: the block 3..5
    assert set(res["runs"]) == {"0.0", "0.75"}
    val = np.array(res["runs"]["0.75"]["val_acc"])
    assert val.shape == (3, res["config"]["epochs"])  # (seeds, epochs)
    assert len(set(map(tuple, val))) == 3  # three seeds, three different runs
    report = (out / "REPORT.md").read_text()
    assert "![dropout](dropout.png)" in report and "seeds 3, 4, 5" in report
    assert findings.RULE in report
    # The findings quote the JSON's numbers and are stored with their verdicts.
    final_val = val[:, -3:].mean(1)
    assert f"{final_val.mean():.3f} [{final_val.min():.3f}, {final_val.max():.3f}]" in report
    assert len(res["findings"]) == 4
    for finding in res["findings"]:
        assert f"- {finding['text']}" in report
        what, verdict = finding["verdict"].split(": ", 1)
        assert finding["text"].startswith(what) and verdict.split(" by ")[0] in finding["text"]


# The whole benchmark script: every rule's timing rounds, an 8-device sharded row and the adapters'
# rows, each compiled (about 20 s on a quiet machine, whatever the shapes).
@pytest.mark.slow
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
        # The head-to-head rounds run exactly when both of their candidates do.
        pair = row["head_to_head"]
        assert (pair is None) == ("torch" not in row["seconds"]), pair
        assert pair is None or set(pair) == {"native", "torch"}
    assert ("native_alone_vs_torch" in saved["summary"]) == ("torch" not in saved["missing"])
    # Each candidate runs what it is named for: only "native" calls the kernels.
    for row in saved["batch_norm"] + saved["forward"]:
        calls = row["kernel_calls"]
        assert calls.pop("native") >= 1, row
        assert not any(calls.values()), row
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


def test_running_statistics_note_gives_momentum_to_the_steps():
    from experiments.report import running_stats_note

    # 6 steps at momentum 0.9: 0.9^6 = 53% of the initial values are left.
    note = running_stats_note([0.08, 0.09, 0.07], steps=6, momentum=0.9)
    assert "below chance (0.10)" in note and "0.9^6 = 53%" in note
    assert "0.080 [0.070, 0.090]" in note and "test mode" in note
    assert "0.9^20 = 12%" in running_stats_note([0.15, 0.2, 0.1], steps=20, momentum=0.9)
    assert running_stats_note([0.8, 0.9, 0.7], steps=20, momentum=0.9) is None  # not low


def test_finding_needs_an_effect_beyond_its_seed_spread_and_a_minimum_size():
    from experiments.findings import NO_EFFECT, difference

    clear = difference("Accuracy", "A", [0.95, 0.96, 0.97], "B", [0.90, 0.91, 0.94])
    assert clear.verdict == "Accuracy: A higher than B"
    assert clear.text == ("Accuracy: A 0.960 [0.950, 0.970] vs B 0.917 [0.900, 0.940]; A higher "
                          "than B by 0.043 (per-seed difference +0.043 ± 0.012).")
    # Per-seed differences -0.01, +0.06, +0.04: mean 0.03 < their standard deviation 0.036.
    noisy = difference("Accuracy", "A", [0.95, 0.96, 0.97], "B", [0.96, 0.90, 0.93])
    assert noisy.verdict == f"Accuracy: {NO_EFFECT}" and NO_EFFECT in noisy.text
    # Consistent, but smaller than the 0.02 of accuracy worth stating.
    tiny = difference("Accuracy", "A", [0.951, 0.962, 0.953], "B", [0.940, 0.950, 0.940])
    assert tiny.verdict == f"Accuracy: {NO_EFFECT}"
    assert difference("Loss", "A", [1.0, 1.1], "B", [2.0, 2.2], min_effect=0.05,
                      less="lower").verdict == "Loss: A lower than B"
    # Every seed far ahead although by different amounts (an erratic baseline): a finding.
    assert "higher" in difference("Acc", "A", [0.96, 0.96, 0.97], "B", [0.5, 0.7, 0.9]).verdict


def test_ratio_findings_compare_times_as_log_ratios():
    from experiments.findings import NO_EFFECT, ratio

    slower = ratio("Speed", "graph", [2.0, 1.8, 2.2], "alt", [1.0, 1.0, 1.0])
    assert slower.verdict == "Speed: graph slower than alt" and "1.99x the time" in slower.text
    assert ratio("Speed", "a", [1.05, 1.06, 1.07], "b", [1, 1, 1]).verdict == f"Speed: {NO_EFFECT}"
    assert ratio("Speed", "a", [0.5, 0.6, 0.55], "b", [1, 1, 1]).verdict == "Speed: a faster than b"


def test_findings_refuse_what_they_cannot_compare():
    from experiments.findings import compare

    with pytest.raises(ValueError, match="per-seed values of one length >= 2"):
        compare([0.9], [0.8], min_effect=0.01)
    with pytest.raises(ValueError, match="per-seed values"):
        compare([0.9, 0.8], [0.8, 0.7, 0.6], min_effect=0.01)
    with pytest.raises(ValueError, match="finite"):
        compare([0.9, float("nan")], [0.8, 0.7], min_effect=0.01)


def _dropout_result(rng, gap):
    """A dropout study's JSON as 3 seeds would give it: the baseline overfits by ``gap``."""
    def run(train, val):
        return {"loss": rng.normal(1, 0.01, (3, 10)).tolist(),
                "train_acc": (train + rng.normal(0, 0.004, (3, 8))).tolist(),
                "val_acc": (val + rng.normal(0, 0.004, (3, 8))).tolist()}
    return {"config": {"label_noise": 0.3, "epochs": 8, "num_train": 500},
            "seeds": [0, 1, 2], "runs": {"0.0": run(0.99, 0.99 - gap), "0.75": run(0.88, 0.87)}}


def test_findings_read_the_same_for_other_seeds_when_the_effects_are_clear():
    from experiments.findings import without_numbers
    from experiments.report import summarize_dropout

    rng = np.random.default_rng(0)
    texts = [[without_numbers(f.text) for f in summarize_dropout(_dropout_result(rng, gap))[1]]
             for gap in (0.20, 0.17, 0.23)]
    assert texts[0] == texts[1] == texts[2]
    verdicts = [f.verdict for f in summarize_dropout(_dropout_result(rng, 0.2))[1]]
    assert verdicts[:3] == [
        "Without dropout, final accuracy (last 3 epochs): train (noisy labels) higher than "
        "validation",
        "Final validation accuracy (mean of the last 3 epochs): drop rate 0.75 higher than no "
        "dropout",
        "Final train - validation gap (last 3 epochs): drop rate 0.75 smaller than no dropout"]
    assert without_numbers("0.952 [0.94, 0.96]; +0.012 1e-4") == "# [#, #]; # #"


def test_seed_blocks_are_disjoint_replications():
    from experiments.seeds import seed_block

    assert seed_block(0, 3) == [0, 1, 2] and seed_block(1, 3) == [3, 4, 5]
    assert seed_block(2, 5) == [10, 11, 12, 13, 14]
    with pytest.raises(ValueError, match="num_seeds"):
        seed_block(0, 0)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        seed_block(-1, 3)


def test_label_noise_is_drawn_per_seed_and_leaves_validation_clean():
    from experiments.seeds import stack_splits

    splits = [data.load_digits(seed=s) for s in (0, 1)]
    clean = stack_splits(splits, num_train=1000, flat=True)
    noisy = stack_splits(splits, num_train=1000, flat=True, label_noise=0.3, noise_seeds=[0, 1])
    wrong = np.mean(np.asarray(noisy.y_train) != np.asarray(clean.y_train), axis=1)
    assert np.all(np.abs(wrong - 0.27) < 0.05)  # 30% redrawn, a tenth of them unchanged
    np.testing.assert_array_equal(noisy.y_val, clean.y_val)
    np.testing.assert_array_equal(noisy.x_train, clean.x_train)
    again = stack_splits(splits, num_train=1000, flat=True, label_noise=0.3, noise_seeds=[0, 1])
    np.testing.assert_array_equal(again.y_train, noisy.y_train)
    flipped = np.asarray(noisy.y_train) != np.asarray(clean.y_train)
    assert not np.array_equal(flipped[0], flipped[1])  # each seed its own noise


@pytest.mark.slow  # two trainings, each compiled (about 10 s)
def test_fit_seeds_trains_each_seed_as_training_fit_would_alone():
    import jax
    import optax

    from experiments.seeds import fit_seeds, init_seeds, stack_splits
    from jaxbn import nets, training

    seeds = [3, 7]
    splits = [data.load_digits(seed=s) for s in seeds]
    together = stack_splits(splits, num_train=100, flat=True)
    init = lambda key: nets.init_mlp(key, 64, [16], 10, normalization="batchnorm",
                                     dropout_rate=0.3, weight_scale=0.1)
    params, state = init_seeds(init, seeds)
    history = fit_seeds(nets.apply_mlp, params, state, optax.adam(1e-2), together, seeds,
                        epochs=2, batch_size=25, num_train_eval=100, progress=False)
    assert history["loss"].shape == (2, 8, 1) and history["val_acc"].shape == (2, 2, 1)
    # The second seed, trained alone by training.fit with that seed's keys and data, gives the
    # same run: the vmap over seeds mixes nothing between them.
    p, s = init(jax.random.key(seeds[1]))
    flat = data.flatten(splits[1])
    alone = training.fit(nets.apply_mlp, p, s, optax.adam(1e-2),
                         (flat["train"][0][:100], flat["train"][1][:100]), val_data=flat["val"],
                         key=jax.random.fold_in(jax.random.key(seeds[1]), 1), epochs=2,
                         batch_size=25, progress=False)
    np.testing.assert_allclose(history["loss"][1, :, 0], alone.history["loss"], rtol=2e-5)
    np.testing.assert_allclose(history["val_acc"][1, :, 0], alone.history["val_acc"], atol=1e-6)
    np.testing.assert_allclose(history["train_acc"][1, :, 0], alone.history["train_acc"],
                               atol=1e-6)
    assert not np.allclose(history["loss"][0], history["loss"][1])  # another seed, another run


@pytest.mark.slow
def test_train_step_quick_writes_a_table_and_json_and_the_fused_step_makes_fewer_passes(
        tmp_path, capsys):
    import jaxbn
    from experiments import train_step

    result = train_step.main(["--quick", "--repeats", "1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "train_step.json").read_text())
    assert saved["nets"] == json.loads(json.dumps(result["nets"]))
    assert [row["net"] for row in saved["nets"]] == ["mlp", "conv"]
    assert "batch-norm overhead" in printed and "dropout (rate 0.5)" in printed
    native = jaxbn.native_status()["enabled"]
    for row in saved["nets"]:
        assert {name for name, _, _ in train_step.JAX_VARIANTS} <= set(row["seconds"])
        assert {"jaxbn", "jaxbn jnp", "flax"} <= set(row["overhead_seconds"])
        total = {name: p["reads"] + p["writes"] for name, p in row["passes"].items()}
        assert total["jaxbn jnp"] <= total["jaxbn-unfused jnp"]
        # The kernels' epilogue removes the ReLU's own passes (a custom call is a fusion
        # barrier: unfused, the ReLU and its mask are passes of their own).
        if native:
            assert total["jaxbn"] < total["jaxbn-unfused"], row["passes"]
        assert f"{row['net']} {'x'.join(map(str, row['batch']))}" in printed
    assert {"jaxbn (packed mask)", "bernoulli+where"} <= set(saved["dropout"]["seconds"])
