"""base_seed: the tiny-base start model follows base_seed while data order and engine stay on seed; records
made before the setting existed stay valid, and the cpu profile's seeds share the base of seed 0."""
import pytest

from epi.experiments.base_build import base_config
from epi.experiments.profiles import resolve
from epi.experiments.run import differing_settings
from epi.experiments.runner import run_experiment
from epi.models.base_cache import base_dir

SMALL = dict(tasks=["math", "chat"], steps_per_task=3, eval_records=3, eval_every=0, base_steps=6)


def test_run_name_names_the_base_seed_only_when_it_differs_from_the_seed():
    assert resolve("smoke", seed=3, base_seed=0).run_name == "mix-full_sft-s3-b0"
    assert resolve("smoke", seed=0, base_seed=0).run_name == resolve("smoke", seed=0).run_name == "mix-full_sft-s0"
    assert resolve("cpu", seed=0).run_name == "mix-full_sft-s0"
    assert resolve("cpu", seed=2).run_name == "mix-full_sft-s2-b0"


def test_the_cpu_profile_shares_the_base_of_seed_0_and_smoke_keeps_one_per_seed():
    cpu0, cpu3 = resolve("cpu", seed=0), resolve("cpu", seed=3)
    assert cpu3.base_seed == 0 and cpu3.start_seed == 0
    assert base_dir(base_config(cpu3)) == base_dir(base_config(cpu0))
    # a base cached before base_seed existed (key of seed 0, no base_seed) is the one found now
    assert base_dir(base_config(cpu0)) == base_dir(resolve("cpu", seed=0, base_seed=None))
    assert base_dir(base_config(cpu0)).name.startswith("tiny-base-s0-")
    # negative control: without base_seed each seed has its own base
    smoke3 = resolve("smoke", seed=3)
    assert smoke3.base_seed is None and base_dir(base_config(smoke3)).name.startswith("tiny-base-s3-")


def test_a_record_without_base_seed_equals_the_same_start_model_and_differs_from_another():
    old = resolve("smoke", seed=1).to_dict()
    del old["base_seed"]  # a record written before the setting existed
    assert differing_settings(old, resolve("smoke", seed=1)) == ""
    assert differing_settings(old, resolve("smoke", seed=1, base_seed=1)) == ""  # same start model
    assert "base_seed=1 vs 0" in differing_settings(old, resolve("smoke", seed=1, base_seed=0))


def test_base_seed_must_be_a_seed_or_null():
    with pytest.raises(ValueError, match="base_seed must be an int"):
        resolve("smoke", base_seed=-1)
    with pytest.raises(ValueError, match="base_seed must be an int"):
        resolve("smoke", base_seed="0")


def test_seeds_on_one_base_seed_share_the_start_model_but_not_the_data_order(tmp_path, monkeypatch):
    monkeypatch.setenv("EPI_CACHE", str(tmp_path / "cache"))
    on_0 = run_experiment(resolve("smoke", seed=0, **SMALL), tmp_path / "runs")
    on_1 = run_experiment(resolve("smoke", seed=1, base_seed=0, **SMALL), tmp_path / "runs")
    bases = sorted(p.name for p in (tmp_path / "cache" / "base").iterdir())
    assert len(bases) == 1 and bases[0].startswith("tiny-base-s0-")  # one base built, for seed 0
    assert on_1["base_scores"] == on_0["base_scores"]  # the same start model, the same evaluation
    assert on_1["config"]["base_seed"] == 0 and (tmp_path / "runs" / "mix-full_sft-s1-b0" / "results.json").exists()
    assert on_1["losses"] != on_0["losses"]  # data order stays on the run's seed
    # negative control: seed 1 on its own base starts from another model
    own = run_experiment(resolve("smoke", seed=1, **SMALL), tmp_path / "runs")
    assert len(list((tmp_path / "cache" / "base").iterdir())) == 2
    assert [own["base_scores"][t]["loss"] for t in SMALL["tasks"]] != \
        [on_0["base_scores"][t]["loss"] for t in SMALL["tasks"]]


def test_runs_that_differ_only_in_beta_share_one_base_with_the_importance_of_their_beta(tmp_path, monkeypatch):
    import torch

    from epi.experiments.base_build import ensure_base
    from epi.models.base_cache import BASE_BETAS, load_base_importance
    from epi.tasks import ABILITIES
    monkeypatch.setenv("EPI_CACHE", str(tmp_path / "cache"))
    cfgs = {b: resolve("smoke", seed=0, beta=b, **SMALL) for b in BASE_BETAS}
    folders = {ensure_base(c) for c in cfgs.values()}
    assert len(folders) == 1 and len(list((tmp_path / "cache" / "base").iterdir())) == 1   # built once
    (folder,) = folders
    imp = {b: load_base_importance(folder, b) for b in BASE_BETAS}
    name = next(iter(imp[0.9]["global"]))
    assert "global" in imp[0.9] and set(imp[0.9]) <= {"global", *ABILITIES}   # per task: those its 6 steps saw
    # each β is its own EMA of the same gradients: a faster decay keeps more of the last steps
    assert not torch.equal(imp[0.9]["global"][name], imp[0.999]["global"][name])
    # a run at β = 0.99 reads that β's importance (the engine is seeded from it)
    run = run_experiment(resolve("smoke", seed=0, method="epi", beta=0.99, **SMALL), tmp_path / "runs")
    assert run["config"]["beta"] == 0.99
    # another β gets a base of its own that records it; asking a base for a β it lacks names the choices
    other = ensure_base(resolve("smoke", seed=0, beta=0.95, **SMALL))
    assert other != folder and set(torch.load(other / "importance.pt", weights_only=True)) == {"0.9", "0.95", "0.99", "0.999"}
    with pytest.raises(KeyError, match="not 0.95"):
        load_base_importance(folder, 0.95)


def test_a_base_built_on_every_core_equals_the_one_thread_build_bit_for_bit(tmp_path, monkeypatch):
    import os

    import torch
    from safetensors.torch import load_file

    import epi.experiments.base_build as bb
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: nothing to compare")
    cfg = resolve("smoke", seed=0, tasks=["math", "chat"], eval_records=3, base_steps=30)
    monkeypatch.setenv("EPI_SOLO_THREADS", "1")                   # the cap `make test` sets for its two workers
    assert bb.build_threads(cfg) == 1
    monkeypatch.delenv("EPI_SOLO_THREADS")
    assert bb.build_threads(cfg) >= 2
    before = torch.get_num_threads()
    many = bb.build_base(cfg, cache_dir=str(tmp_path / "many"), progress=False)
    assert torch.get_num_threads() == before                      # the caller's thread count is given back
    monkeypatch.setattr(bb, "build_threads", lambda cfg: 1)
    one = bb.build_base(cfg, cache_dir=str(tmp_path / "one"), progress=False)
    a, b = load_file(str(many / "model.safetensors")), load_file(str(one / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ia, ib = torch.load(many / "importance.pt"), torch.load(one / "importance.pt")
    assert all(torch.equal(ia[k][s][n], ib[k][s][n]) for k in ia for s in ia[k] for n in ia[k][s])
    from epi.models.base_cache import base_meta
    ma, mb = base_meta(many), base_meta(one)
    assert ma["scores"] == mb["scores"] and ma["torch_threads"] >= 2 and mb["torch_threads"] == 1
