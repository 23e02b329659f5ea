"""The memory plan of notebook 07: engine bytes per parameter as the engine counts them, and a plan that
trims or refuses what would not fit a card (its memory and capability passed in: no GPU needed)."""
import pytest
import torch

from epi import EPIConfig, EvolvingIsolation
from epi.integrations.memory import LEAN, engine_bytes_per_param, estimate, model_shape, plan
from epi.integrations.recipe import METHODS, choose_precision
from epi.models.shapes import random_model

QWEN_05B = "qwen2.5-0.5b"  # the gpu profile's model shape (Qwen2.5-0.5B-Instruct's config), counted on meta


@pytest.fixture(scope="module")
def qwen():
    return model_shape(QWEN_05B)


def measured_bytes_per_param(scope, n_tasks, ratio, lean):
    """Run the engine on a small Qwen2 through one refresh of every task; return its bytes per weight."""
    model = random_model("qwen2-tiny")
    cfg = EPIConfig(scope=scope, ratio=ratio, warmup_steps=0, refresh_every=10, **(LEAN if lean else {}))
    opt = torch.optim.AdamW(model.parameters())
    iso = EvolvingIsolation(model, cfg).attach(opt)
    g = torch.Generator().manual_seed(0)
    tasks = [f"t{i}" for i in range(n_tasks)]
    for t in tasks:
        for p in iso.params:
            p.grad = torch.rand(p.shape, generator=g)
        iso.observe(t)
    iso.refresh()
    for t in tasks:
        iso.active(t)
    for p in model.parameters():  # one step under the last task's mask: its protected values are held from here
        p.grad = torch.rand(p.shape, generator=g)
    iso.observe(tasks[-1])
    opt.step()
    mem = iso.memory_bytes()
    sample = sum(s.numel() * s.element_size() for s in iso._sample)
    return (mem["importance"] + mem["masks"] + mem["diagnostics"] - sample) / mem["params"]


@pytest.mark.parametrize("scope,n_tasks", [("global", 1), ("per_task", 5)])
@pytest.mark.parametrize("lean", [False, True])
def test_engine_bytes_per_parameter_bound_what_the_engine_counts(scope, n_tasks, lean):
    formula = engine_bytes_per_param(scope, n_tasks, 0.1, lean)
    measured = measured_bytes_per_param(scope, n_tasks, 0.1, lean)
    # global scope is exact (a top-p set holds a few more than p·n when values tie at the threshold);
    # per-task uses the bound (K-1)·p on the union of the other tasks' sets, which independent random
    # sets (union 1-(1-p)^(K-1)) stay just under
    assert measured <= 1.001 * formula
    gap = 0.0 if scope == "global" else n_tasks * 4 * ((n_tasks - 1) * 0.1 - (1 - 0.9 ** (n_tasks - 1)))
    assert abs(formula - gap - measured) < 0.01 * formula, (formula, gap, measured)


def test_the_shape_is_counted_on_the_meta_device(qwen):
    assert 490e6 < qwen.params < 500e6  # Qwen2.5-0.5B: 494 M parameters (tied embeddings counted once)
    assert qwen.isolatable == 24 * (2 * 896 * 896 + 2 * 896 * 128 + 3 * 896 * 4864)


def test_a_free_t4_refuses_per_task_epi_with_the_reason(qwen):
    precision = choose_precision("auto", cuda=True, capability=(7, 5), profile="gpu")
    assert precision == "fp16"  # a T4 has no bf16
    p = plan(qwen, METHODS, n_tasks=5, ratio=0.1, batch_size=16, micro_batch=4, seq_len=512, precision=precision,
             free_gib=14.6)
    assert p.methods == ["full_sft", "epi"]
    reason = p.dropped()["epi_per_task"]
    assert "lean engine" in reason and "micro-batch 1" in reason and "GiB" in reason
    assert all(r["total"] <= p.budget_gib for r in p.rows if r["runs"])
    per_task = next(r for r in p.rows if r["method"] == "epi_per_task")
    assert per_task["total"] > p.budget_gib and per_task["engine"] > 5  # ≈ 7.3 GiB of lean per-task engine


def test_a_large_gpu_runs_every_method_with_the_default_engine(qwen):
    precision = choose_precision("auto", cuda=True, capability=(8, 0), profile="gpu")
    p = plan(qwen, METHODS, n_tasks=5, ratio=0.1, batch_size=16, micro_batch=4, seq_len=512, precision=precision,
             free_gib=79.0)
    assert precision == "bf16" and p.methods == list(METHODS) and not p.lean and p.micro_batch == 4
    assert p.dropped() == {}


def test_a_tight_gpu_trims_to_the_lean_engine_or_a_smaller_micro_batch_before_dropping(qwen):
    kw = dict(n_tasks=5, ratio=0.1, batch_size=16, micro_batch=4, seq_len=512, precision="bf16")
    epi_only = {"epi": "global"}
    default = estimate(qwen, "global", lean=False, micro_batch=4, checkpointing=True, **{k: v for k, v in kw.items()
                       if k not in ("batch_size", "micro_batch")})["total"]
    p = plan(qwen, epi_only, free_gib=(default - 0.2) / 0.9, **kw)  # just too small for the default engine
    assert p.methods == ["epi"] and p.lean and p.micro_batch == 4 and p.grad_accum == 4
    p = plan(qwen, epi_only, free_gib=(default - 0.2) / 0.9, engine_memory="default", **kw)
    assert p.methods == ["epi"] and not p.lean and p.micro_batch < 4 and p.micro_batch * p.grad_accum == 16


def test_without_a_gpu_nothing_is_checked_or_dropped(qwen):
    p = plan(qwen, METHODS, n_tasks=5, ratio=0.1, batch_size=16, micro_batch=4, seq_len=512, precision="fp32",
             free_gib=None)
    assert p.methods == list(METHODS) and {r["reason"] for r in p.rows} == {"no GPU: not checked"}


def test_precision_follows_the_device():
    assert choose_precision("auto", cuda=False) == "fp32"
    assert choose_precision("auto", cuda=True, capability=(9, 0), profile="full") == "bf16_weights"
    assert choose_precision("bf16", cuda=False) == "bf16"
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        choose_precision("fp16", cuda=False)
    with pytest.raises(ValueError, match="precision must be"):
        choose_precision("int8", cuda=True)
