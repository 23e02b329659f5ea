"""Metrics against hand-computed values on small matrices (expected numbers are worked out in the comments)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from epi.analysis import metrics as M

# R[j, i] = score on task i after stage j.
R = [[0.8, 0.1, 0.2],
     [0.6, 0.9, 0.3],
     [0.5, 0.7, 0.6]]
BASE = [0.1, 0.2, 0.3]


# ---------------------------------------------------------------- scores after training

def test_final_scores_and_average_score_use_the_last_row():
    np.testing.assert_allclose(M.final_scores(R), [0.5, 0.7, 0.6])
    assert M.average_score(R) == pytest.approx(0.6)  # (0.5 + 0.7 + 0.6) / 3


def test_normalized_scores_divide_by_single_task_references():
    scores, refs = [48.2, 25.1, 55.3, 7.1, 7.5], [50.0, 25.0, 55.3, 7.1, 10.0]
    np.testing.assert_allclose(M.normalized_scores(scores, refs), [0.964, 1.004, 1.0, 1.0, 0.75])
    # 10 * (0.964 + 1.004 + 1 + 1 + 0.75) / 5 = 10 * 4.718 / 5
    assert M.average_normalized_score(scores, refs) == pytest.approx(9.436)
    assert M.average_normalized_score(scores, refs, scale=1.0) == pytest.approx(0.9436)


def test_naive_divide_by_ten_rule_gives_5_49_not_cpi_ft_table1_6_58():
    # CPI-FT Table 1, LLaMA-2 Full SFT: (0.482 + 0.251 + 0.553 + 0.71 + 0.75) / 5 * 10 = 5.492, printed 6.58.
    ans = M.average_normalized_score([48.2, 25.1, 55.3, 7.1, 7.5], [100, 100, 100, 10, 10])
    assert ans == pytest.approx(5.492)
    assert abs(ans - 6.58) > 1.0


@pytest.mark.parametrize("refs", [[1.0, 0.0], [1.0, -2.0]])
def test_non_positive_references_raise(refs):
    with pytest.raises(ValueError, match="references must all be > 0"):
        M.normalized_scores([0.5, 0.5], refs)


# ---------------------------------------------------------------- sequential setting

def test_forgetting_is_best_earlier_score_minus_final():
    # task 0: max(0.8, 0.6) - 0.5 = 0.3; task 1: max(0.1, 0.9) - 0.7 = 0.2; last task excluded.
    np.testing.assert_allclose(M.forgetting_per_task(R), [0.3, 0.2])
    assert M.average_forgetting(R) == pytest.approx(0.25)


def test_forgetting_max_includes_stages_before_the_task_was_trained():
    R2 = [[0.9, 0.4, 0.0],
          [0.2, 0.3, 0.0],
          [0.2, 0.1, 0.5]]
    # task 1: Chaudhry max over stages {0, 1} = 0.4 (stage 0, before training task 1) -> 0.4 - 0.1 = 0.3
    np.testing.assert_allclose(M.forgetting_per_task(R2), [0.7, 0.3])
    # forgetting rate only looks at stages >= i: task 1 best is 0.3 -> (0.3 - 0.1) / 0.3 = 2/3
    np.testing.assert_allclose(M.forgetting_rate(R2), [0.7 / 0.9, 2 / 3, 0.0])


def test_backward_transfer_paper_and_gem_code_normalisations():
    # R[2,0] - R[0,0] = -0.3; R[2,1] - R[1,1] = -0.2; R[2,2] - R[2,2] = 0
    assert M.backward_transfer(R) == pytest.approx(-0.25)  # -0.5 / 2
    assert M.backward_transfer_gem_code(R) == pytest.approx(-0.5 / 3)


# the hand matrix of the metric definitions: R[j, i] = score on task i after stage j
HAND = [[0.8, 0.1, 0.2],
        [0.5, 0.9, 0.3],
        [0.4, 0.6, 0.7]]


def test_named_metrics_on_the_hand_matrix():
    # Chaudhry: task 0 max(0.8, 0.5) - 0.4 = 0.4; task 1 max(0.1, 0.9) - 0.6 = 0.3; mean 0.35
    np.testing.assert_allclose(M.forgetting_per_task(HAND), [0.4, 0.3])
    assert M.forgetting_chaudhry(HAND) == pytest.approx(0.35)
    # GEM paper: ((0.4 - 0.8) + (0.6 - 0.9)) / 2 = -0.35; GEM code: the same sum / 3 = -0.2333
    assert M.bwt(HAND) == pytest.approx(-0.35)
    assert M.bwt_gem_code(HAND) == pytest.approx(-0.7 / 3) == pytest.approx(-0.2333, abs=1e-4)
    # first minus last: 0.8 - 0.4 = 0.4, 0.9 - 0.6 = 0.3 (here the diagonal is each column's max)
    np.testing.assert_allclose(M.forgetting_first_last_per_task(HAND), [0.4, 0.3])
    assert M.forgetting_first_last(HAND) == pytest.approx(0.35)
    # the named functions are the older names' numbers (notebooks call those)
    assert (M.bwt(R), M.bwt_gem_code(R), M.forgetting_chaudhry(R)) == \
        (M.backward_transfer(R), M.backward_transfer_gem_code(R), M.average_forgetting(R))


def test_chaudhry_and_first_last_forgetting_differ_when_a_task_peaks_off_its_own_row():
    R2 = [[0.9, 0.4, 0.0],
          [0.2, 0.3, 0.0],
          [0.2, 0.1, 0.5]]
    # task 1 scored 0.4 before it was trained: Chaudhry 0.4 - 0.1 = 0.3, first-last 0.3 - 0.1 = 0.2
    np.testing.assert_allclose(M.forgetting_per_task(R2), [0.7, 0.3])
    np.testing.assert_allclose(M.forgetting_first_last_per_task(R2), [0.7, 0.2])
    assert M.forgetting_first_last(R2) == pytest.approx(-M.bwt(R2)) == pytest.approx(0.45)
    assert M.forgetting_chaudhry(R2) == pytest.approx(0.5)


def test_retention_is_a_after_b_over_a_after_a_and_nan_when_a_was_never_learned():
    # hand matrix, task 0: A after A = 0.8, after the last stage 0.4 -> 0.5; task 1: 0.6 / 0.9
    assert M.retention(a_after_a=HAND[0][0], a_after_b=HAND[2][0]) == pytest.approx(0.5)
    assert M.retention(a_after_a=0.9, a_after_b=0.6) == pytest.approx(2 / 3)
    assert M.retention(a_after_a=0.4, a_after_b=0.5) == pytest.approx(1.25)  # B helped A
    # ranks differently from absolute forgetting: 0.8 -> 0.6 forgets 0.2 (keeps 75 %), 0.3 -> 0.2 forgets
    # only 0.1 but keeps 67 %
    assert 0.8 - 0.6 > 0.3 - 0.2
    assert M.retention(a_after_a=0.8, a_after_b=0.6) > M.retention(a_after_a=0.3, a_after_b=0.2)
    assert math.isnan(M.retention(a_after_a=0.0, a_after_b=0.0))
    assert math.isnan(M.retention(a_after_a=0.0, a_after_b=0.2))
    with pytest.raises(ValueError, match="retention needs scores >= 0"):
        M.retention(a_after_a=0.5, a_after_b=-0.1)
    with pytest.raises(ValueError, match="a_after_a=nan"):
        M.retention(a_after_a=math.nan, a_after_b=0.1)


def test_forward_transfer_compares_score_before_training_with_base():
    # (R[0,1] - base[1] + R[1,2] - base[2]) / 2 = ((0.1 - 0.2) + (0.3 - 0.3)) / 2
    assert M.forward_transfer(R, BASE) == pytest.approx(-0.05)


def test_forgetting_rate_is_relative_to_best_score_since_training():
    # task 0: (0.8 - 0.5) / 0.8 = 0.375; task 1: (0.9 - 0.7) / 0.9; last task: 0
    np.testing.assert_allclose(M.forgetting_rate(R), [0.375, 0.2 / 0.9, 0.0])


def test_forgetting_rate_is_zero_when_task_never_scored():
    np.testing.assert_array_equal(M.forgetting_rate([[0.0, 0.1], [0.0, 0.2]]), [0.0, 0.0])


def test_metrics_are_scale_free_between_unit_and_percent_scores():
    R100 = np.asarray(R) * 100
    assert M.average_forgetting(R100) == pytest.approx(25.0)
    np.testing.assert_allclose(M.forgetting_rate(R100), M.forgetting_rate(R))


@pytest.mark.parametrize("fn", [M.final_scores, M.average_score, M.average_forgetting, M.backward_transfer,
                                M.forgetting_rate, M.bwt, M.bwt_gem_code, M.forgetting_chaudhry,
                                M.forgetting_first_last])
def test_non_square_score_matrix_raises_naming_R(fn):
    with pytest.raises(ValueError, match="R must be a square"):
        fn([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])


def test_single_task_matrix_is_rejected_where_t_minus_1_divides():
    for fn in (M.average_forgetting, M.forgetting_chaudhry, M.forgetting_first_last, M.bwt):
        with pytest.raises(ValueError, match="at least 2 task"):
            fn([[0.5]])
    assert M.backward_transfer_gem_code([[0.5]]) == 0.0


def test_base_length_mismatch_raises():
    with pytest.raises(ValueError, match="base must have length 3"):
        M.forward_transfer(R, [0.1, 0.2])


# ---------------------------------------------------------------- multi-task mix

def test_seesaw_counts_losers_only_when_some_task_gains():
    out = M.seesaw([0.5, 0.8, 0.3], [0.6, 0.7, 0.3])
    np.testing.assert_allclose(out["delta"], [-0.1, 0.1, 0.0], atol=1e-12)
    assert out["count"] == 1
    assert out["spread"] == pytest.approx(math.sqrt(0.02 / 3))  # population std of (-0.1, 0.1, 0)
    assert out["worst"] == pytest.approx(-0.1)


def test_uniform_drop_is_not_a_seesaw():
    out = M.seesaw([0.5, 0.6], [0.6, 0.7])
    assert out["count"] == 0
    assert out["worst"] == pytest.approx(-0.1)


def test_seesaw_length_mismatch_and_empty_raise():
    with pytest.raises(ValueError, match="references must have length 2"):
        M.seesaw([0.5, 0.6], [0.6])
    with pytest.raises(ValueError, match="scores must be a non-empty"):
        M.seesaw([], [])


def test_table2_matches_cpi_ft_sign_convention():
    # Full SFT row of CPI-FT Table 2: dA = -24.5, dB = +13.4
    out = M.table2(a_before=10.0, a_after_a=60.0, a_after_b=35.5, b_after_a=20.0, b_after_b=33.4)
    assert out["forgetting_A"] == pytest.approx(24.5)
    assert out["delta_A"] == pytest.approx(-24.5)
    assert out["learning_B"] == out["delta_B"] == pytest.approx(13.4)
    assert out["learning_A"] == pytest.approx(50.0)
    assert math.isnan(M.table2(a_after_a=1, a_after_b=1, b_after_a=0, b_after_b=1)["learning_A"])


def test_mean_of_last_averages_the_last_k_evaluations():
    assert M.mean_of_last([0.1, 0.5, 0.6, 0.7], k=3) == pytest.approx(0.6)
    assert M.mean_of_last([0.4, 0.6], k=3) == pytest.approx(0.5)  # fewer than k: all of them
    np.testing.assert_allclose(M.mean_of_last([[0.0, 1.0], [0.2, 0.5], [0.4, 0.7]], k=2), [0.3, 0.6])
    with pytest.raises(ValueError, match="history_scores"):
        M.mean_of_last([])
    with pytest.raises(ValueError, match="k must be"):
        M.mean_of_last([0.1], k=0)


def test_summarize_seeds_uses_sample_sd():
    mean, sd = M.summarize_seeds([0.66, 0.71, 0.76])
    assert mean == pytest.approx(0.71)
    assert sd == pytest.approx(0.05)  # sqrt((0.05^2 + 0 + 0.05^2) / 2)
    assert M.mean_sd([0.66, 0.71, 0.76]) == "0.71 ± 0.05"
    assert math.isnan(M.summarize_seeds([0.7])[1])
    assert M.mean_sd([0.7], digits=1) == "0.7 (1 seed)"
    with pytest.raises(ValueError, match="values"):
        M.summarize_seeds([])


# ---------------------------------------------------------------- masks and importance

def test_jaccard_churn_released_on_equal_size_masks():
    prev, cur = np.array([1, 1, 0, 0], bool), np.array([0, 1, 1, 0], bool)
    assert M.jaccard(prev, cur) == pytest.approx(1 / 3)  # 1 shared of 3
    assert M.churn(prev, cur) == pytest.approx(1.0)  # 2 changed / 2 current
    assert M.released_fraction(prev, cur) == pytest.approx(0.5)  # 1 of 2 released


def test_churn_divides_by_current_and_released_by_previous_size():
    prev, cur = np.array([1, 1, 1, 0], bool), np.array([1, 0, 0, 1], bool)
    assert M.jaccard(prev, cur) == pytest.approx(0.25)
    assert M.churn(prev, cur) == pytest.approx(1.5)  # |{1, 2, 3}| / |cur| = 3 / 2
    assert M.released_fraction(prev, cur) == pytest.approx(2 / 3)


def test_mask_metrics_sum_counts_over_lists_and_dicts_of_torch_tensors():
    prev = [torch.tensor([True, False]), torch.tensor([True, True, False])]
    cur = [torch.tensor([True, True]), torch.tensor([False, True, False])]
    # shared 1 + 1 = 2, |prev| = 3, |cur| = 3, union = 4, changed = 2
    for a, b in [(prev, cur), (dict(zip("xy", prev)), dict(zip("xy", cur)))]:
        j, c, r = M.jaccard(a, b), M.churn(a, b), M.released_fraction(a, b)
        assert (j, c, r) == pytest.approx((0.5, 2 / 3, 1 / 3))
        assert all(type(v) is float for v in (j, c, r))
    assert M.jaccard(prev[1], cur[1].numpy()) == pytest.approx(0.5)
    assert M.jaccard([True, True, False], [False, True, False]) == pytest.approx(0.5)  # a list of bools is one mask


def test_empty_masks_have_documented_values():
    empty = np.zeros(3, bool)
    assert M.jaccard(empty, empty) == 1.0
    assert M.churn(empty, empty) == 0.0
    assert M.released_fraction(empty, np.ones(3, bool)) == 0.0
    assert M.churn(np.ones(3, bool), empty) == math.inf


def test_mask_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        M.jaccard(np.zeros(3, bool), np.zeros(4, bool))
    with pytest.raises(ValueError, match="same length"):
        M.churn([np.zeros(3, bool)], [np.zeros(3, bool)] * 2)


def test_spearman_averages_tied_ranks_by_hand():
    # ranks x = (1, 2.5, 2.5, 4), ranks y = (1, 3, 2, 4); centred: (-1.5, 0, 0, 1.5), (-1.5, .5, -.5, 1.5)
    # rho = 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert M.spearman([1, 2, 2, 4], [10, 30, 20, 40]) == pytest.approx(math.sqrt(0.9))


def test_spearman_matches_scipy_with_ties_and_tensors():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 200).astype(float), rng.normal(size=200)
    y[:50] = x[:50]
    assert M.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert M.spearman(torch.tensor(x), torch.tensor(y)) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert math.isnan(M.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="same length"):
        M.spearman([1, 2], [1, 2, 3])


def test_drift_summary_skips_missing_first_refresh_values():
    history = [
        {"step": 10, "protected_fraction": 0.1, "jaccard_prev": None, "jaccard_first": 1.0, "churn": None,
         "released_fraction": None, "spearman_prev": float("nan"), "per_layer": {"w": 0.2}, "scope_key": "global"},
        {"step": 20, "protected_fraction": 0.1, "jaccard_prev": 0.6, "jaccard_first": 0.6, "churn": 0.5,
         "released_fraction": 0.25, "spearman_prev": 0.8, "per_layer": {"w": 0.1}, "scope_key": "global"},
        {"step": 30, "protected_fraction": 0.1, "jaccard_prev": 0.8, "jaccard_first": 0.5, "churn": 0.3,
         "released_fraction": 0.15, "spearman_prev": 0.9, "per_layer": {"w": 0.3}, "scope_key": "global"},
    ]
    s = M.drift_summary(history)
    assert s["refreshes"] == 3 and s["final_step"] == 30
    assert s["jaccard_prev_mean"] == pytest.approx(0.7) and s["jaccard_prev_last"] == pytest.approx(0.8)
    assert s["jaccard_first_final"] == pytest.approx(0.5)
    assert s["churn_mean"] == pytest.approx(0.4) and s["churn_last"] == pytest.approx(0.3)
    assert s["released_fraction_mean"] == pytest.approx(0.2)
    assert s["spearman_prev_mean"] == pytest.approx(0.85)
    assert s["per_layer_final"] == {"w": 0.3}
    with pytest.raises(ValueError, match="scope 'math'"):
        M.drift_summary(history, scope="math")
    with pytest.raises(ValueError, match="no refresh entries"):
        M.drift_summary([])


def test_drift_over_scopes_averages_each_keys_last_jaccard_to_its_first_mask():
    def entry(key, prev, first, churn):
        return {"step": 0, "scope_key": key, "protected_fraction": 0.1, "jaccard_prev": prev, "jaccard_first": first,
                "churn": churn, "released_fraction": None}
    history = [entry("math", None, 1.0, None), entry("code", None, 1.0, None),
               entry("math", 0.6, 0.6, 0.4), entry("code", 0.8, 0.3, 0.2)]
    s = M.drift_over_scopes(history)
    assert s["jaccard_first_final"] == pytest.approx((0.6 + 0.3) / 2)   # not 0.3, the last entry alone
    assert M.drift_summary(history)["jaccard_first_final"] == pytest.approx(0.3)  # what pooling would say
    assert s["jaccard_prev_mean"] == pytest.approx(0.7) and s["churn_mean"] == pytest.approx(0.3)
    assert math.isnan(s["released_fraction_mean"])
    # a lean engine keeps no first mask, and a run may end before its first refresh: nan, not an error
    assert math.isnan(M.drift_over_scopes([entry("g", 0.5, None, 0.1)])["jaccard_first_final"])
    assert all(math.isnan(v) for v in M.drift_over_scopes([]).values())


# ---------------------------------------------------------------- gradient conflict

def _grads(*vectors):
    return [torch.tensor(v, dtype=torch.float32) for v in vectors]


def test_cosine_of_orthogonal_and_opposite_gradients():
    out = M.conflict_scores({"a": _grads([1.0, 0.0]), "b": _grads([0.0, 1.0]), "c": _grads([-1.0, 0.0])})
    np.testing.assert_allclose(out["cosine"], [[1, 0, -1], [0, 1, 0], [-1, 0, 1]], atol=1e-12)


def test_conflict_scores_global_per_layer_rate_gms_by_hand():
    grads = {"a": _grads([1, 0], [1, 1]), "b": _grads([1, 0], [-1, -1]), "c": _grads([0, 2], [-1, 0])}
    out = M.conflict_scores(grads, names=["l0", "l1"])
    # <a,b> = 1 - 2 = -1, <a,c> = 0 - 1 = -1, <b,c> = 0 + 1 = 1; |a|^2 = |b|^2 = 3, |c|^2 = 5
    s15 = 1 / math.sqrt(15)
    np.testing.assert_allclose(out["cosine"], [[1, -1 / 3, -s15], [-1 / 3, 1, s15], [-s15, s15, 1]], atol=1e-7)
    np.testing.assert_allclose(out["norm"], [math.sqrt(3), math.sqrt(3), math.sqrt(5)], rtol=1e-7)
    r2 = 1 / math.sqrt(2)
    np.testing.assert_allclose(out["per_layer"]["l0"], [[1, 1, 0], [1, 1, 0], [0, 0, 1]], atol=1e-7)
    np.testing.assert_allclose(out["per_layer"]["l1"], [[1, -1, -r2], [-1, 1, r2], [-r2, r2, 1]], atol=1e-7)
    # pairs (ab, ac, bc) x layers (l0, l1): negative only l1/ab and l1/ac -> 2 / 6
    assert out["conflict_rate"] == pytest.approx(1 / 3)
    # gms_ab = 2*3/(3+3) = 1; gms_ac = 2*sqrt(15)/(3+5) = sqrt(15)/4
    g = math.sqrt(15) / 4
    np.testing.assert_allclose(out["gms"], [[1, 1, g], [1, 1, g], [g, g, 1]], rtol=1e-7)
    # a: (1/3 + 1/sqrt15)/2*100; b: (1/3 + 0)/2*100; c: (1/sqrt15 + 0)/2*100
    score = out["conflict_score_per_task"]
    assert score == pytest.approx({"a": 29.57661, "b": 16.66667, "c": 12.90994}, abs=1e-4)


def test_conflict_rate_skips_layers_where_a_task_has_zero_gradient():
    out = M.conflict_scores({"a": _grads([1, 0], [1]), "b": _grads([-1, 0], [0])})
    assert math.isnan(out["per_layer"]["1"][0, 1])
    assert out["conflict_rate"] == 1.0  # only layer 0 is defined, and it conflicts


def test_conflict_scores_reject_misaligned_or_single_task_grads():
    with pytest.raises(ValueError, match="at least 2 tasks"):
        M.conflict_scores({"a": _grads([1, 0])})
    with pytest.raises(ValueError, match="not aligned"):
        M.conflict_scores({"a": _grads([1, 0]), "b": _grads([1, 0, 0])})
    with pytest.raises(ValueError, match="names must have one entry"):
        M.conflict_scores({"a": _grads([1, 0]), "b": _grads([0, 1])}, names=["x", "y"])


def _linear_and_batches():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    batches = {t: {"x": torch.randn(4, 3), "y": torch.randn(4, 2)} for t in ("math", "code")}
    return model, batches


def _mse(model, batch):
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])


def test_task_gradients_equal_autograd_gradients_on_a_linear_model():
    model, batches = _linear_and_batches()
    model.train()
    model.weight.grad = torch.full_like(model.weight, 7.0)  # a pending gradient must survive
    grads = M.task_gradients(model, batches, loss_fn=_mse)
    for task, batch in batches.items():
        expected = torch.autograd.grad(_mse(model, batch), list(model.parameters()))
        for got, want in zip(grads[task], expected):
            torch.testing.assert_close(got, want)
    assert model.training
    torch.testing.assert_close(model.weight.grad, torch.full_like(model.weight, 7.0))
    assert model.bias.grad is None
    assert all(not g.requires_grad and g.grad_fn is None for g in grads["math"])


def test_task_gradients_use_model_loss_skip_frozen_params_and_average_batch_lists():
    lin, batches = _linear_and_batches()
    lin.bias.requires_grad_(False)
    model = torch.nn.Module()
    model.lin = lin
    model.forward = lambda x, y: SimpleNamespace(loss=_mse(lin, {"x": x, "y": y}))
    model.eval()
    grads = M.task_gradients(model, {"both": [batches["math"], batches["code"]]})
    assert M.trainable_parameter_names(model) == ["lin.weight"] and len(grads["both"]) == 1
    want = sum(torch.autograd.grad(_mse(lin, b), lin.weight)[0] for b in batches.values()) / 2
    torch.testing.assert_close(grads["both"][0], want)
    assert not model.training
