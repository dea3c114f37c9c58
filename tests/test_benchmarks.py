"""The benchmark scripts stay runnable (tiny sizes), and their arithmetic is right."""

import pytest

from benchmarks import gpu, harness, steps
from benchmarks.sweep_overhead import covered_seconds


def test_covered_seconds_is_the_length_of_the_union():
    assert covered_seconds([]) == 0.0
    assert covered_seconds([(0, 2), (1, 3), (5, 6), (5.5, 5.8)]) == pytest.approx(4.0)


def test_per_round_ratio_cancels_a_slow_round():
    samples = {"a": [2.0, 20.0, 2.0], "b": [1.0, 10.0, 1.0]}
    assert harness.median_ratio(samples, "a", "b") == 2.0
    assert harness.medians(samples)["a"] == 2.0


def test_card_peaks():
    assert gpu.card_peak("NVIDIA H100 80GB HBM3", None) == 989e12
    assert gpu.card_peak("NVIDIA H100 PCIe", None) == 756e12
    assert gpu.card_peak("Some GPU", None) is None and gpu.card_peak("Some GPU", 100) == 100e12


def test_gpu_and_step_scripts_run_on_tiny_models(capsys):
    assert gpu.main(["--device", "cpu", "--teacher", "vit_micro_patch4", "--student", "resnet10t", "--img", "16",
                     "--batch", "4", "--steps", "1", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "teacher SAM fine-tuning" in out and "student distillation" in out
    assert steps.main(["--rounds", "2", "--sam-model", "vit_micro_patch4", "--teacher", "vit_micro_patch4",
                       "--student", "resnet10t", "--img", "16", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    for measure in ("SAM step / AdamW step", "cached targets / student only", "per-parameter loop"):
        assert measure in out
