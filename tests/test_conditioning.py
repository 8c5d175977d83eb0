"""conditioning.py: embedder shapes, gate schedules, control dropout, independent condition dropout."""
import math

import pytest
import torch

from conditioning import (
    CONTROL_GROUPS,
    SIGNAL,
    ClassEmbedder,
    ControlEmbedder,
    TimestepEmbedder,
    drop_flags,
    gate,
    make_control,
    normalise_control,
)


def ctrl_batch(n=4):
    return torch.stack([make_control(16 + 8 * i, 64, i, 2 * i, i % 2, 32) for i in range(n)])


def test_gate_values_at_the_ends():
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(gate("cosine", t), torch.tensor([1.0, math.cos(math.pi / 4), 0.0]), atol=1e-6)
    assert torch.equal(gate("none", t), torch.ones(3))
    assert torch.allclose(gate("linear", t), torch.tensor([1.0, 0.5, 0.0]))
    assert torch.allclose(gate("cosine_pow", t), torch.tensor([1.0, 0.5, 0.0]), atol=1e-6)
    assert torch.equal(gate("off", t), torch.zeros(3))
    with pytest.raises(ValueError, match="unknown gate"):
        gate("no-such-gate", t)


def test_embedder_shapes():
    assert TimestepEmbedder(32)(torch.rand(5)).shape == (5, 32)
    tok, pooled = ClassEmbedder(10, 32, tokens=3)(torch.tensor([0, 10]))
    assert tok.shape == (2, 3, 32) and pooled.shape == (2, 32)
    emb = ControlEmbedder(32)(ctrl_batch())
    assert emb.shape == (4, len(CONTROL_GROUPS), 32)
    assert ControlEmbedder(32).gate_weights(torch.rand(4)).shape == (4, len(CONTROL_GROUPS))


def test_control_normalisation_is_resolution_relative():
    a = normalise_control(make_control(256, 256, 32, 16, 1, 256)[None])[0]
    b = normalise_control(make_control(512, 512, 64, 32, 1, 512)[None])[0]
    assert a[SIGNAL["crop_top"]] == b[SIGNAL["crop_top"]] == 0.125 and a[SIGNAL["flip"]] == 1
    assert b[SIGNAL["orig_h"]] - a[SIGNAL["orig_h"]] == 1  # log2 scale: doubling a size adds 1


def test_control_groups_are_separate_and_drop_uses_null():
    emb = ControlEmbedder(16)
    torch.nn.init.normal_(emb.null)
    c = ctrl_batch(2)
    c2 = c.clone()
    c2[:, SIGNAL["flip"]] = 1 - c2[:, SIGNAL["flip"]]
    e1, e2 = emb(c), emb(c2)
    groups = list(CONTROL_GROUPS)
    for g, name in enumerate(groups):  # flipping changes the flip group's embedding only
        assert torch.equal(e1[:, g], e2[:, g]) == (name != "flip")
    dropped = emb(c, drop=torch.tensor([True, False]))
    assert torch.equal(dropped[0], emb.null) and torch.equal(dropped[1], e1[1])


def test_gated_sum_weights_each_group_by_its_gate():
    """sum_k g_k(t) e_ctrl,k against the schedules written out by hand, one group per kind of gate."""
    emb = ControlEmbedder(16, gates={"size": "cosine", "crop": "off", "flip": "linear"})
    e = torch.randn(3, len(CONTROL_GROUPS), 16)
    t = torch.tensor([0.0, 0.3, 1.0])
    g = {"size": torch.cos(math.pi * t / 2), "crop": torch.zeros(3), "flip": 1 - t}
    ref = sum(g[name][:, None] * e[:, k] for k, name in enumerate(CONTROL_GROUPS))
    assert emb.gated(e, t).shape == (3, 16)
    assert torch.allclose(emb.gated(e, t), ref, atol=1e-6)
    group = list(CONTROL_GROUPS).index
    # t = 0: data
    assert torch.allclose(emb.gated(e, torch.zeros(3)), e[:, group("size")] + e[:, group("flip")])


def test_condition_dropout_rates_are_independent():
    g = torch.Generator().manual_seed(0)
    sem_drop, drop = drop_flags(20000, 0.1, 0.3, g)
    sem = sem_drop.float()
    assert abs(sem.mean() - 0.1) < 0.01 and abs(drop.float().mean() - 0.3) < 0.015
    assert abs((sem * drop.float()).mean() - 0.03) < 0.006  # joint rate = product: independent
    sem3, drop3 = drop_flags(20000, 0.0, 0.0, g)
    assert not sem3.any() and not drop3.any()


def test_a_dropped_label_becomes_the_null_class():
    emb = ClassEmbedder(10, 8, tokens=2)
    y = torch.tensor([3, 7, 0])
    tok, pooled = emb(y, drop=torch.tensor([True, False, True]))
    null, _ = emb(torch.tensor([10]))
    kept, _ = emb(y)
    assert torch.equal(tok[0], null[0]) and torch.equal(tok[2], null[0]) and torch.equal(tok[1], kept[1])
    assert torch.equal(pooled, tok.mean(1))
