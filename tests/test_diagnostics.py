"""The paper's diagnostics: filter norms per epoch, zeroed filters, dead pooled features, val logit norm."""

import csv

import numpy as np
import pytest
import torch

from powergrad_train.config.build import build_config
from powergrad_train.training.diagnostics import ZEROED_NORM, PooledFeatureWatch, conv_filter_norms, load_filter_norms
from powergrad_train.training.models import build_model
from tests.conftest import load_weights, tiny_overrides


def test_filter_norms_are_saved_every_epoch_from_the_epoch_s_weights(two_epoch_run):
    model = build_model(build_config(None, ["model.name=resnet10t", "model.num_classes=10"]).model)
    rows = list(csv.DictReader(open(two_epoch_run / "summary.csv")))
    for epoch in (1, 2):
        saved = load_filter_norms(two_epoch_run / "diagnostics" / f"filter-norms-epoch-{epoch:04d}.npz")
        model.load_state_dict(load_weights(two_epoch_run / f"epoch-{epoch:04d}.pt"))
        expected = conv_filter_norms(model)
        assert saved.keys() == expected.keys() and len(saved) == sum(
            isinstance(m, torch.nn.Conv2d) for m in model.modules())
        for name in expected:
            np.testing.assert_allclose(saved[name], expected[name], rtol=1e-6)
        zeroed = sum(int((v < ZEROED_NORM).sum()) for v in saved.values())
        assert int(rows[epoch - 1]["zeroed_filters"]) == zeroed


def test_summary_has_the_val_logit_norm_and_dead_features(two_epoch_run):
    """Both counted again from the saved weights over the val images, computed another way."""
    from powergrad_train.data import build_val_loader
    from powergrad_train.reproduction.report import read_run
    cfg = read_run(two_epoch_run).cfg
    model = build_model(cfg.model).eval()
    model.load_state_dict(load_weights(two_epoch_run / "last.pt"))
    loader, _ = build_val_loader(cfg.data, rank=0, world_size=1)
    with torch.no_grad():
        pooled = torch.cat([model.forward_head(model.forward_features(x), pre_logits=True) for x, _ in loader])
        logits = model.get_classifier()(pooled)
    loader.close()
    last = list(csv.DictReader(open(two_epoch_run / "summary.csv")))[-1]
    assert int(last["dead_features"]) == int((pooled.abs().amax(0) == 0).sum())
    assert float(last["eval_logit_norm"]) == pytest.approx(logits.norm(dim=1).mean().item(), rel=1e-4)


def test_dead_pooled_feature_channels_are_counted(tiny_root):
    torch.manual_seed(0)
    model = build_model(build_config(None, ["model.name=resnet10t", "model.num_classes=10"]).model).eval()
    watch = PooledFeatureWatch(model)
    images = torch.randn(8, 3, 32, 32)

    def dead():
        watch.start()
        with torch.no_grad():
            model(images[:4])
            model(images[4:])  # two batches: a channel is dead only if zero in both
        return watch.dead_channels()

    before = dead()
    alive = (watch.peak > 0).nonzero().flatten()[:5]
    block = model.layer4[-1]
    with torch.no_grad():  # zero both paths into the last ReLU for 5 channels that were alive
        for bn in (block.bn2, block.downsample[-1]):
            bn.weight[alive] = 0
            bn.bias[alive] = 0
    assert dead() == before + 5
    watch.close()


def test_a_filter_norm_file_that_cannot_be_written_is_one_line_and_no_partial_file(tiny_root, tmp_path):
    from tests.test_run_folder import limited_run
    run_dir = tmp_path / "run"
    result = limited_run(run_dir, tiny_overrides(tiny_root), 8000)  # the first file over 8 kB: epoch 1's norms
    npz = run_dir / "diagnostics" / "filter-norms-epoch-0001.npz"
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [f"error: {npz}: cannot write (File too large)"]
    assert list((run_dir / "diagnostics").iterdir()) == []
