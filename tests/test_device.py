"""Device discipline on a CPU-only machine: every place that turns tensors into host data (checksums,
the non-finite scan, files, tensors sent to other ranks, metrics, diagnostics) is run with tensors
that refuse host conversion the way CUDA tensors do, so the CPU suite fails where a GPU run would."""

import pickle

import numpy as np
import pytest
import torch

from powergrad_train.config.build import build_config
from powergrad_train.training import checkpoint
from powergrad_train.training.checkpoint import Checkpointer
from powergrad_train.training.diagnostics import conv_filter_norms
from powergrad_train.training.metrics import EvalMeter, TrainMeter
from powergrad_train.training.models import build_model


class DeviceTensor(torch.Tensor):
    """Holds its data like a CUDA tensor as far as the host is concerned: .numpy(), numpy arrays and
    pickling fail until .cpu() (or .to("cpu")) gives a plain host tensor; everything computed from it
    stays on its 'device'. .item(), .tolist() and bool() work, as on CUDA (they synchronise)."""

    @staticmethod
    def __new__(cls, data):
        return torch.Tensor._make_subclass(cls, data)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_host = func is torch.Tensor.cpu or (func is torch.Tensor.to and "cpu" in map(str, (*args[1:], *kwargs.values())))
        if to_host:
            with torch._C.DisableTorchFunctionSubclass():
                return args[0].clone()
        return super().__torch_function__(func, types, args, kwargs)

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to "
                        "host memory first.")

    def __array__(self, *args, **kwargs):
        self.numpy()

    def __reduce_ex__(self, protocol):
        raise pickle.PicklingError("a device tensor was pickled: copy it to the host first")


def on_device(tree):
    if isinstance(tree, torch.Tensor):
        return DeviceTensor(tree)
    if isinstance(tree, dict):
        return {k: on_device(v) for k, v in tree.items()}
    return tree


class Part:
    """A checkpoint part whose state lives on the device, as a GPU model's and optimizer's do."""

    def __init__(self, state):
        self.state, self.loaded = state, None

    def state_dict(self):
        return on_device(self.state)

    def load_state_dict(self, state):
        self.loaded = state


def test_the_fake_fails_where_cuda_tensors_fail():
    t = DeviceTensor(torch.ones(3))
    for convert in (lambda: t.numpy(), lambda: np.asarray(t), lambda: pickle.dumps(t),
                    lambda: t.detach().view(torch.uint8).numpy(), lambda: (t * 2).numpy()):
        with pytest.raises((TypeError, pickle.PicklingError)):
            convert()
    assert type(t.cpu()) is torch.Tensor and t.sum().item() == 3.0 and t.tolist() == [1.0, 1.0, 1.0]


def pickled_gather(obj):
    """What all_gather_object does to a rank's object under torch.distributed: pickle it."""
    return [pickle.loads(pickle.dumps(obj))]


def test_checksum_scan_save_and_load_of_device_state(tmp_path):
    weights = {"w": torch.randn(4, 3), "running_var": torch.rand(4), "steps": torch.tensor(7)}
    ckpt = Checkpointer(tmp_path, 1, parts={"model": Part(weights)}, per_rank={"meter": Part({"s": torch.ones(2)})},
                        meta={"world_size": 1})
    state = ckpt.state_dict(pickled_gather)
    assert ckpt.nonfinite_parts(state) == []
    checkpoint.save_atomic(state, tmp_path / "last.pt")
    loaded = checkpoint.load(tmp_path / "last.pt")
    assert all(torch.equal(loaded["model"][k], weights[k]) for k in weights)
    assert torch.equal(loaded["meter"][0]["s"], torch.ones(2))
    broken = Checkpointer(tmp_path, 1, parts={"model": Part({"w": torch.tensor([1.0, float("nan")])})},
                          per_rank={}, meta={})
    assert broken.nonfinite_parts(broken.state_dict(pickled_gather)) == ["model.w"]


def test_meters_read_device_sums_explicitly():
    meter = TrainMeter(torch.device("cpu"))
    meter.sums = DeviceTensor(meter.sums)
    meter.update(torch.tensor(2.0), torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    assert meter.read()["loss"] == pytest.approx(2.0)
    state = meter.state_dict()
    pickle.dumps(state)  # host tensors, ready to be gathered from every rank
    evaluation = EvalMeter(torch.device("cpu"))
    evaluation.sums = DeviceTensor(evaluation.sums)
    evaluation.update(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    assert evaluation.read()["images"] == 4


def test_filter_norms_of_device_weights():
    model = build_model(build_config(None, ["model.name=resnet10t", "model.num_classes=3"]).model)
    expected = conv_filter_norms(model)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.weight.data = DeviceTensor(module.weight.data)
    norms = conv_filter_norms(model)
    assert norms.keys() == expected.keys()
    assert all(np.array_equal(norms[k], expected[k]) for k in norms)
