"""data/balance.py: class weights and the class-balanced epoch order of data.balance."""

import pytest
import torch
import torch.nn.functional as F

from ddcnn.data.balance import balanced_order, class_weights
from ddcnn.data.loading import DeviceBatches
from ddcnn.data.readers import ImageDataset
from ddcnn.errors import DataError
from ddcnn.models import local_loss
from ddcnn.train.engine.batches import TensorBatches


def test_class_weights_and_a_missing_class():
    labels = torch.tensor([0] * 6 + [1] * 2)
    weights = class_weights(labels, 2)
    assert torch.allclose(weights, torch.tensor([8 / (2 * 6), 8 / (2 * 2)]))
    # every class weighs the same in total
    assert torch.allclose(weights[0] * 6, weights[1] * 2)
    with pytest.raises(DataError, match=r"class\(es\) \[2\] have none"):
        class_weights(labels, 3)


def test_a_balanced_epoch_draws_each_class_about_equally_often():
    labels = torch.tensor([0] * 900 + [1] * 100)
    order = balanced_order(labels, 2, torch.Generator().manual_seed(0))
    assert len(order) == 1000
    share = (labels[order] == 1).float().mean().item()
    assert 0.45 < share < 0.55
    same = balanced_order(labels, 2, torch.Generator().manual_seed(0))
    assert torch.equal(order, same)


def test_the_batch_sources_draw_balanced_epochs_when_asked():
    ds = ImageDataset(torch.randn(200, 1, 4, 4), torch.tensor([0] * 180 + [1] * 20), ["a", "b"])
    seen = torch.cat([y for _, y in DeviceBatches(ds, 50, seed=1, balanced=True)])
    assert 0.4 < (seen == 1).float().mean().item() < 0.6
    plain = torch.cat([y for _, y in DeviceBatches(ds, 50, seed=1)])
    assert (plain == 1).sum() == 20
    tensors = torch.cat([y for _, y in TensorBatches(torch.randn(200, 3), ds.labels, 50, 1, balanced=2)])
    assert 0.4 < (tensors == 1).float().mean().item() < 0.6


def test_the_local_loss_with_class_weights_is_each_local_cnns_weighted_cross_entropy():
    logits, targets = torch.randn(6, 3, 2), torch.tensor([0, 0, 0, 0, 1, 1])
    weight = class_weights(targets, 2)
    total, per = local_loss(logits, targets, weight)
    for i in range(3):
        assert torch.allclose(per[i], F.cross_entropy(logits[:, i], targets, weight=weight))
    assert torch.allclose(total, per.sum())
