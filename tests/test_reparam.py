"""Pure re-parameterization functions against the layers they replace (float64)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from updp.pruner import reparam
from updp.pruner.verify import randomize_bn_stats


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _conv_bn(cin, cout, k, stride=1, groups=1):
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=0, groups=groups, bias=True)
    bn = randomize_bn_stats(nn.BatchNorm2d(cout), seed=cout + k).eval()
    return conv, bn


@pytest.mark.parametrize("groups", [1, 4])
def test_fold_conv_bn_matches_conv_then_bn(groups):
    conv, bn = _conv_bn(8, 8, 3, groups=groups)
    x = torch.randn(2, 8, 9, 11)
    folded = reparam.fold_conv_bn(conv, bn)
    assert_close(F.conv2d(x, folded.weight, folded.bias), bn(conv(x)), atol=1e-12, rtol=0)


@pytest.mark.parametrize("k1,s1,k2,s2", [(3, 1, 3, 1), (3, 2, 3, 1), (1, 1, 3, 2), (3, 1, 1, 1), (5, 2, 1, 1)])
def test_compose_convs_equals_chain(k1, s1, k2, s2):
    a, bn_a = _conv_bn(3, 6, k1, stride=s1)
    b, bn_b = _conv_bn(6, 5, k2, stride=s2)
    x = torch.randn(2, 3, 17, 14)  # odd and even sizes: the stride-2 borders
    composed = reparam.compose_convs(reparam.fold_conv_bn(a, bn_a), reparam.fold_conv_bn(b, bn_b))
    assert composed.weight.shape[-1] == k1 + (k2 - 1) * s1
    assert_close(F.conv2d(x, composed.weight, composed.bias, composed.stride), bn_b(b(bn_a(a(x)))),
                 atol=1e-11, rtol=0)


def test_dense_weight_expands_depthwise():
    dw = nn.Conv2d(4, 4, 3, groups=4, padding=1)
    x = torch.randn(1, 4, 6, 6)
    assert_close(F.conv2d(x, reparam.dense_weight(dw), dw.bias, padding=1), dw(x), atol=1e-12, rtol=0)


def test_add_at_offset_adds_identity_at_centre():
    conv = reparam.Conv(torch.zeros(4, 4, 3, 3), torch.zeros(4), 1)
    merged = reparam.add_at_offset(conv, torch.eye(4), None, 1)
    x = torch.randn(1, 4, 5, 5)
    assert_close(F.conv2d(x, merged.weight, merged.bias, padding=1), x)


def test_linear_folds():
    lin = nn.Linear(6, 4)
    bn = randomize_bn_stats(nn.BatchNorm1d(6)).eval()
    x = torch.randn(5, 6)
    w, b = reparam.fold_linear_bn(lin, bn)
    assert_close(x @ w.T + b, lin(bn(x)), atol=1e-12, rtol=0)
    bn_out = randomize_bn_stats(nn.BatchNorm1d(4), seed=3).eval()
    w2, b2 = reparam.fold_bn_after_linear(lin.weight.detach(), lin.bias.detach(), bn_out)
    assert_close(x @ w2.T + b2, bn_out(lin(x)), atol=1e-12, rtol=0)
