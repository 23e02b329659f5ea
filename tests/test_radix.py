"""The exact global top-k threshold: radix select equals kthvalue on the concatenated values."""
import pytest
import torch

from epi.engine.masks import radix_threshold, top_p_masks


def kth_largest(tensors, k):
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    return torch.kthvalue(flat, flat.numel() - k + 1).values


@pytest.mark.parametrize("seed", range(5))
def test_radix_threshold_equals_kthvalue_on_random_tensors(seed):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.rand(37, 11, generator=g), torch.rand(500, generator=g) ** 4,
               torch.randn(64, 64, generator=g).abs() * 1e-6, torch.rand(3, generator=g) * 1e4]
    n = sum(t.numel() for t in tensors)
    for k in [1, 2, 7, n // 100, n // 20, n // 2, n - 1, n]:
        assert radix_threshold(tensors, k).item() == kth_largest(tensors, k).item()


def test_radix_threshold_with_ties_and_zeros():
    tensors = [torch.zeros(100), torch.tensor([1.0, 1.0, 1.0, 2.0]), torch.full((10,), 0.5)]
    for k in range(1, 115):
        assert radix_threshold(tensors, k).item() == kth_largest(tensors, k).item()
    # ties: every value equal to the threshold is protected, so the realised count can exceed k
    masks = top_p_masks(tensors, ratio=2 / 114, normalize="none")
    assert sum(int(m.sum()) for m in masks) == 4  # k=2 lands on the tied 1.0s: 2.0 and three 1.0s


def test_radix_threshold_handles_bfloat16_and_per_tensor_scales():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(200, generator=g).bfloat16(), torch.rand(300, generator=g) * 50
    scales = [float(a.float().mean()), float(b.mean())]
    got = radix_threshold([a, b], 40, scales=scales)
    assert got.item() == kth_largest([a.float() / scales[0], b / scales[1]], 40).item()


def test_radix_threshold_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        radix_threshold([torch.rand(3)], 0)
    with pytest.raises(ValueError, match="exceeds"):
        radix_threshold([torch.rand(3)], 4)


def test_radix_threshold_all_reduces_histograms_in_a_process_group(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        tensors = [torch.rand(1000), torch.rand(77)]
        assert radix_threshold(tensors, 50, group=dist.group.WORLD).item() == kth_largest(tensors, 50).item()
    finally:
        dist.destroy_process_group()
