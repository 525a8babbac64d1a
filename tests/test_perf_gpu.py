"""`platebench perf gpu`: refused in one line without CUDA, before Ray starts; its measuring parts, run on the CPU
(the same code on the GPU), report what they measured."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from platebench.harness import ray_local
from platebench.harness.cli import main
from platebench.harness.perf import gpu

pytestmark = pytest.mark.unit


def test_without_cuda_it_is_one_line_and_exit_2_before_ray(monkeypatch, capsys):
    def no_ray(*args, **kwargs):
        raise AssertionError("perf gpu started Ray before finding that there is no CUDA device")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ray_local, "init", no_ray)
    assert main(["perf", "gpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0]


def test_kit_steps_pass_a_learning_method_and_name_a_flat_loss():
    assert gpu.kit_steps("erm", "cpu", "fp32") is None
    # One step cannot show a falling loss: the check names the method, the precision and the losses.
    failure = gpu.kit_steps("erm", "cpu", "fp32", steps=1)
    assert failure is not None and failure.startswith("erm fp32: loss did not fall")


def test_kit_steps_report_an_exception_instead_of_raising():
    failure = gpu.kit_steps("erm", "cpu", "fp99")
    assert failure is not None and failure.startswith("erm fp99: ")


def _event(start: float, end: float, cuda: bool = True):
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    return SimpleNamespace(device_type=kind, time_range=SimpleNamespace(start=start, end=end))


def test_kernel_time_counts_overlapping_kernels_once_and_ignores_host_events():
    prof = SimpleNamespace(events=lambda: [_event(0, 10), _event(5, 15), _event(20, 30), _event(22, 25),
                                           _event(0, 100, cuda=False)])
    assert gpu.kernel_busy_us(prof) == 25  # [0, 15] and [20, 30]


def test_loop_figures_time_steps_of_the_stream(tiny_dataset):
    out = gpu.loop_figures(str(tiny_dataset), "fp32", "cpu", backbone="resnet-tiny", batch_size=4, steps=2,
                           warmup=1)
    assert out["peak_mem_gib"] is None and out["gpu_busy_fraction"] is None  # CUDA-only figures
    # The preparation is a part of a step, so it cannot take longer per image than the whole step.
    assert 0 < out["prep_s_per_image"] < 1 / out["images_per_s"]
    with pytest.raises(Exception, match="training steps of 4"):
        gpu.loop_figures(str(tiny_dataset), "fp32", "cpu", backbone="resnet-tiny", batch_size=4, steps=500)
