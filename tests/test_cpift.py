"""CPI-FT pieces: core regions, Jaccard grouping, SLERP with its linear fallback, transplant fusion."""
import math

import pytest
import torch

from epi.methods import cpift


def test_core_regions_are_the_global_top_p_of_update_magnitude():
    deltas = {"a": [torch.tensor([[0.0, -5.0], [1.0, 0.1]]), torch.tensor([4.0, -0.2, 0.0, 3.0])]}
    cores = cpift.core_regions(deltas, ratio=3 / 8)
    assert cores["a"][0].tolist() == [[False, True], [False, False]]
    assert cores["a"][1].tolist() == [True, False, False, True]


def test_grouping_is_connected_components_at_tau():
    names = ["a", "b", "c", "d"]
    s = [[1, 0.3, 0.0, 0.0], [0.3, 1, 0.12, 0.0], [0.0, 0.12, 1, 0.05], [0.0, 0.0, 0.05, 1]]
    assert cpift.group_tasks(names, s, 0.1) == [["a", "b", "c"], ["d"]]  # a–b–c chain, d alone
    assert cpift.group_tasks(names, s, 0.2) == [["a", "b"], ["c"], ["d"]]
    assert cpift.group_tasks(names, s, 1.1) == [["a"], ["b"], ["c"], ["d"]]  # no grouping


def test_core_similarity_is_the_jaccard_index_of_the_cores():
    cores = {"a": [torch.tensor([True, True, False, False])], "b": [torch.tensor([False, True, True, False])]}
    assert cpift.core_similarity(cores) == [[1.0, 1 / 3], [1 / 3, 1.0]]


def test_slerp_follows_the_great_circle_and_falls_back_to_lerp():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = cpift.slerp(a, b, 0.5)
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))  # unit norm kept, unlike lerp
    assert torch.allclose(cpift.slerp(a, b, 0.0), a) and torch.allclose(cpift.slerp(a, b, 1.0), b)
    c = torch.tensor([2.0, 0.0])  # collinear with a: linear fallback
    assert torch.allclose(cpift.slerp(a, c, 0.25), torch.tensor([1.25, 0.0]))


def test_fuse_transplants_cores_and_slerps_the_rest():
    base = [torch.tensor([1.0, 1.0, 1.0, 1.0])]
    probes = {"a": [torch.tensor([5.0, 1.0, 1.0, 2.0])], "b": [torch.tensor([1.0, -3.0, 1.0, 1.5])]}
    cores = {"a": [torch.tensor([True, False, False, True])], "b": [torch.tensor([False, True, False, True])]}
    fused = cpift.fuse(base, probes, cores, weight=0.5)[0]
    assert fused[0] == 5.0 and fused[1] == -3.0  # each task's core from its own probe
    assert fused[3] == 2.0  # overlap: the larger |Δθ| (a: 1.0 vs b: 0.5) wins
    mean = cpift.slerp(probes["a"][0], probes["b"][0], 0.5)
    expected = cpift.slerp(base[0], mean, 0.5)
    assert fused[2] == pytest.approx(float(expected[2]))  # non-core coordinate: SLERP result
