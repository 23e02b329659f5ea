"""The write-back of protected values (epi.engine.isolation): AdamW keeps its own fused decay, free coordinates take
exactly torch's AdamW step, protected ones move 0.0, a write from outside the optimizer is kept, the held values
are counted in memory_bytes(), and zeroing gradients by index equals masked_fill_."""
import copy

import torch

from epi import EPIConfig, EvolvingIsolation
from helpers import one_thread, small_llama  # noqa: F401 (one_thread: an autouse fixture)

VOCAB = 48


def _batch(seed):
    return torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(seed))


def _engine(model, **cfg):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    iso = EvolvingIsolation(model, EPIConfig(**{"ratio": 0.1, "refresh_every": 100, "warmup_steps": 1, **cfg}))
    iso.attach(opt)
    return iso, opt


def _step(model, iso, opt, seed):
    x = _batch(seed)
    model(input_ids=x, labels=x).loss.backward()
    iso.observe("a")
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_free_coordinates_take_torchs_own_adamw_step_and_protected_ones_move_zero():
    model = small_llama()
    iso, opt = _engine(model)
    _step(model, iso, opt, 0)                      # warm-up ends: the first mask is in force from here
    assert iso.isolator.mode == "grad" and opt.param_groups[0]["weight_decay"] == 0.1
    for seed in (1, 2, 3):
        ref = copy.deepcopy(model)                 # plain AdamW, fed what grad mode promises: masked gradients
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
        ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))   # a copy: the step counters are shared tensors
        masks = {n: m.clone() for n, m in iso.masks.items()}
        x = _batch(seed)
        ref(input_ids=x, labels=x).loss.backward()
        refp = dict(ref.named_parameters())
        for n, m in masks.items():
            refp[n].grad.masked_fill_(m, 0.0)
            ref_opt.state[refp[n]]["exp_avg"].masked_fill_(m, 0.0)
        ref_opt.step()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _step(model, iso, opt, seed)
        for n, p in model.named_parameters():
            m = masks.get(n, torch.zeros_like(p, dtype=torch.bool))
            assert torch.equal(p[m], before[n][m]), n                  # protected: exactly 0.0 moved
            assert torch.equal(p[~m], refp[n].detach()[~m]), n          # free: bit for bit torch's AdamW
        assert sum(int(m.sum()) for m in masks.values()) > 0


def test_a_write_from_outside_the_optimizer_to_a_protected_coordinate_is_kept():
    model = small_llama()
    iso, opt = _engine(model)
    _step(model, iso, opt, 0)
    _step(model, iso, opt, 1)                      # the protected values are held now
    name, mask = next((n, m) for n, m in iso.masks.items() if m.any())
    param = dict(model.named_parameters())[name]
    with torch.no_grad():
        param[mask] = 42.0                         # e.g. CPI-FT's fusion writing merged weights
    for seed in (2, 3):
        _step(model, iso, opt, seed)
        assert bool((param[mask] == 42.0).all())   # kept, and protected from here on


def test_the_held_values_are_counted_in_memory_bytes():
    model = small_llama()
    iso, opt = _engine(model)
    _step(model, iso, opt, 0)
    before = iso.memory_bytes()["masks"]           # the stored bool masks: the active mask is not built yet
    _step(model, iso, opt, 1)
    count = iso.active().count
    # the active mask's int32 index and the fp32 values held for the write-back: 4 + 4 bytes per protected coordinate
    assert iso.memory_bytes()["masks"] - before == (4 + 4) * count and count > 0


def test_literal_and_restore_modes_write_back_exactly_over_many_steps():
    for mode in ("literal", "restore"):
        model = small_llama()
        iso, opt = _engine(model, mode=mode, refresh_every=2)
        for seed in range(8):
            masks = {n: m.clone() for n, m in iso.masks.items()}
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            _step(model, iso, opt, seed)
            for n, p in model.named_parameters():
                if n in masks:
                    assert torch.equal(p[masks[n]], before[n][masks[n]]), (mode, seed, n)
        assert len(iso.history) >= 3   # the mask moved several times: the held values were re-gathered


def test_zeroing_gradients_by_index_equals_masked_fill():
    model = small_llama()
    iso, opt = _engine(model)
    _step(model, iso, opt, 0)
    x = _batch(5)
    model(input_ids=x, labels=x).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    name = "model.layers.0.mlp.up_proj.weight"
    first = int(iso.masks[name].view(-1).nonzero()[0])
    grads[name].view(-1)[first] = float("nan")     # a NaN on a protected coordinate is zeroed too
    for n, p in model.named_parameters():
        if n in grads:
            p.grad.copy_(grads[n])
    iso.mask_gradients()
    for n, m in iso.masks.items():
        assert torch.equal(dict(model.named_parameters())[n].grad, grads[n].masked_fill(m, 0.0)), n
    assert not dict(model.named_parameters())[name].grad.isnan().any()


def test_without_weight_decay_grad_mode_holds_nothing_and_protected_coordinates_still_move_zero():
    model = small_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)   # HF Trainer's default decay
    iso = EvolvingIsolation(model, EPIConfig(ratio=0.1, refresh_every=2, warmup_steps=1)).attach(opt)
    for seed in range(8):
        masks = {n: m.clone() for n, m in iso.masks.items()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _step(model, iso, opt, seed)
        for n, m in masks.items():
            assert torch.equal(dict(model.named_parameters())[n][m], before[n][m]), (seed, n)
    assert iso.isolator.mode == "grad" and len(iso.history) >= 3
    assert iso.isolator.held_tensors() == []       # m = 0 and g = 0: Adam's update is exactly 0, nothing to write
    opt.param_groups[0]["weight_decay"] = 0.1      # decay switched on mid-run: held and written back from then on
    masks = {n: m.clone() for n, m in iso.masks.items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model, iso, opt, 9)
    assert iso.isolator.held_tensors()
    for n, m in masks.items():
        assert torch.equal(dict(model.named_parameters())[n][m], before[n][m]), n


def test_the_cpu_fold_equals_the_foreach_update_bit_for_bit_and_zeroes_the_protected_gradients(monkeypatch):
    import epi.engine.importance as importance
    monkeypatch.setattr(importance, "_FOLD", 64)    # small tensors take the chunked walk too
    monkeypatch.setattr(importance, "_FOLD_SMALL", 1500)  # ... except the smallest: one foreach pass for those
    model = small_llama()
    iso, opt = _engine(model, beta=0.9)
    _step(model, iso, opt, 0)
    x = _batch(7)
    model(input_ids=x, labels=x).loss.backward()
    grads = [p.grad.clone() for p in iso.params]
    ema = [b.clone() for b in iso.tracker.buffers["global"]]
    masks = [m.clone() for m in iso.masks.values()]
    torch._foreach_mul_(ema, 0.9)
    torch._foreach_addcmul_(ema, grads, grads, value=1 - 0.9)      # the reference: one foreach pass per operation
    iso.observe("a")
    assert any(p.numel() > 1500 for p in iso.params) and any(p.numel() < 1500 for p in iso.params)
    assert sum(int(m.sum()) for m in masks) > 0
    for b, ref, p, g, m in zip(iso.tracker.buffers["global"], ema, iso.params, grads, masks):
        assert torch.equal(b, ref)                                   # importance from the true gradient
        assert torch.equal(p.grad, g.masked_fill(m, 0.0))            # then the protected gradients zeroed


def test_zeroing_and_writing_back_follow_logical_coordinates_on_a_strided_tensor():
    from epi.engine.importance import put_flat, zero_coordinates
    t = torch.arange(12.0).view(3, 4).t()                          # 4 x 3, column-major: not contiguous
    index = torch.tensor([1, 5, 10], dtype=torch.int32)            # row-major flat coordinates of the 4 x 3 view
    want = t.contiguous()
    want.view(-1)[index.long()] = 0.0
    zero_coordinates([t], [index])
    assert torch.equal(t, want) and not t.is_contiguous()          # written in place, not into a copy
    put_flat(t, index, torch.tensor([7.0, 8.0, 9.0]))
    assert t.reshape(-1)[index.long()].tolist() == [7.0, 8.0, 9.0]


def test_a_strided_parameter_is_isolated_exactly():
    """A parameter stored transposed (its gradient and moments follow its strides) keeps its protected
    coordinates exactly under both write-back modes, and in the lean mode (bfloat16 importance, index masks)."""
    for mode, cfg in (("grad", {}), ("restore", {}), ("auto", {"importance_dtype": "bfloat16", "mask_format": "index"})):
        model = small_llama()
        mlp = model.model.layers[0].mlp
        mlp.up_proj.weight = torch.nn.Parameter(mlp.up_proj.weight.detach().t().contiguous().t())
        assert not mlp.up_proj.weight.is_contiguous()
        iso, opt = _engine(model, mode=mode, refresh_every=2, **cfg)
        name = "model.layers.0.mlp.up_proj.weight"
        for seed in range(6):
            mask = iso.masks[name].clone()
            before = mlp.up_proj.weight.detach().clone()
            _step(model, iso, opt, seed)
            assert torch.equal(mlp.up_proj.weight.detach()[mask], before[mask]), (mode, seed)
        assert mask.any() and not torch.equal(mlp.up_proj.weight.detach(), before)  # free coordinates moved
