"""DDP and FSDP2 (2 ranks, gloo on CPU, loopback) match a single-process run; FSDP1 and DeepSpeed are refused.

One `torch.distributed.run` launch of `python -m epi.distributed` trains the tiny Llama under DDP, FSDP2
(`fully_shard`) and — on rank 0, without any process group — the single-process reference with the same
global batch, in global and per-task scope.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from helpers import ROOT, small_llama
from epi import EPIConfig, EvolvingIsolation
from epi.engine.backends import check_supported, shard_group
from epi.engine.masks import masks_digest
from epi.integrations.distributed import gather_masks
from epi.integrations.hf import EPICallback

SCOPES = ("global", "per_task")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "epi.distributed", "--out", str(out),
           "--mode", "ddp", "fsdp2", "single", "--scope", *SCOPES, "--steps", "10"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


def load(out: Path, mode: str, scope: str):
    folder = out / f"{mode}-{scope}"
    ranks = [json.loads((folder / f"results_rank{r}.json").read_text()) for r in range(1 if mode == "single" else 2)]
    return ranks, torch.load(folder / "final.pt", weights_only=False)


def assert_matches_single(out: Path, mode: str, scope: str):
    (single,), ref = load(out, "single", scope)
    ranks, final = load(out, mode, scope)
    assert single["state"] == "isolating" and sorted(set(single["refresh_steps"])) == [2, 5, 8]
    assert all(r["refresh_steps"] == single["refresh_steps"] for r in ranks)
    assert set(final["masks"]) == ({"global"} if scope == "global" else {"a", "b"})
    for key, masks in ref["masks"].items():
        assert sum(int(m.sum()) for m in masks) > 0
        assert all(torch.equal(a, b) for a, b in zip(masks, final["masks"][key])), key
    for name, w in ref["weights"].items():
        torch.testing.assert_close(final["weights"][name], w, atol=1e-5, rtol=0)
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(single["losses"]), atol=1e-5, rtol=0)
    return single, ranks


@pytest.mark.parametrize("scope", SCOPES)
def test_ddp_ranks_hold_identical_masks_equal_to_the_single_process_run(runs, scope):
    single, ranks = assert_matches_single(runs, "ddp", scope)
    assert ranks[0]["digests"] == [single["mask_digest"]] * 2  # every rank's own digest, gathered
    assert [r["mask_digest"] for r in ranks] == [single["mask_digest"]] * 2


@pytest.mark.parametrize("scope", SCOPES)
def test_fsdp2_sharded_masks_gather_to_the_single_process_masks(runs, scope):
    single, ranks = assert_matches_single(runs, "fsdp2", scope)
    assert [r["full_mask_digest"] for r in ranks] == [single["mask_digest"]] * 2
    # each rank's engine held only its shard: the local digests differ from each other and from the full one
    local = [r["mask_digest"] for r in ranks]
    assert local[0] != local[1] and single["mask_digest"] not in local


def test_trainer_example_under_ddp_keeps_every_rank_on_the_same_masks(tmp_path):
    """examples/train_hf.py (EPICallback in an unmodified Trainer, per-task scope) under torchrun: DDP."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(ROOT / "examples" / "train_hf.py"), "--out", str(tmp_path),
           "--steps", "6", "--batch-size", "4", "--refresh-every", "2", "--warmup-steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    states = [torch.load(tmp_path / "checkpoint-6" / f"epi_state_rank{r}.pt", weights_only=False) for r in (0, 1)]
    a, b = (s["engine"] for s in states)
    assert a["step"] == b["step"] == 6 and set(a["sets"]) == set(b["sets"]) == {"math", "code"}
    for key in a["sets"]:
        assert all(torch.equal(x, y) for x, y in zip(a["sets"][key], b["sets"][key]))
        assert all(torch.equal(x, y) for x, y in zip(a["tracker"]["buffers"][key], b["tracker"]["buffers"][key]))


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp1_is_refused_with_a_pointer_to_fsdp2(one_rank_group, use_orig_params):
    import warnings

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FSDP(small_llama(), device_id=torch.device("cpu"), use_orig_params=use_orig_params)
    with pytest.raises(NotImplementedError, match="FSDP2"):
        check_supported(model)
    with pytest.raises(NotImplementedError, match="FSDP2"):
        EPICallback(EPIConfig()).on_train_begin(SimpleNamespace(deepspeed=None), SimpleNamespace(global_step=0),
                                                None, model=model, optimizer=None)


def test_deepspeed_is_refused_with_a_pointer_to_fsdp2_or_ddp():
    class DeepSpeedZeroOptimizer:  # stand-ins: detection is by class name / module, deepspeed need not exist
        pass

    class DeepSpeedEngine(torch.nn.Module):
        pass

    model = small_llama()
    with pytest.raises(NotImplementedError, match="FSDP2"):
        check_supported(model, SimpleNamespace(optimizer=DeepSpeedZeroOptimizer()))
    with pytest.raises(NotImplementedError, match="DeepSpeed"):
        check_supported(DeepSpeedEngine())
    with pytest.raises(NotImplementedError, match="DeepSpeed"):
        EPICallback().on_train_begin(SimpleNamespace(deepspeed="ds_config.json"), SimpleNamespace(global_step=0),
                                     None, model=model, optimizer=None)


def test_replicated_models_reduce_over_no_group_and_gather_to_their_own_masks():
    model = small_llama()
    assert shard_group(model) is None  # DDP/single: a group would count every coordinate world_size times
    check_supported(model, torch.optim.AdamW(model.parameters()))
    engine = EvolvingIsolation(model, EPIConfig(ratio=0.1))
    engine.random_masks(0.1)
    assert masks_digest(gather_masks(engine)) == engine.mask_digest()
