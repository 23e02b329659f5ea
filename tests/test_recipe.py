"""The Trainer recipe (epi.integrations.recipe) that notebook 07 and examples/train_hf.py share, and the per-method
store that lets a rerun skip finished methods. Runs on every transformers version the pyproject allows."""
import json
import math

import pytest
import torch

from epi import EPIConfig
from epi.integrations.hf import task_blocks
from epi.integrations.method_store import ENGINE_STATE, RESULT, load_result, run_or_load
from epi.integrations.recipe import (METHODS, SEQUENTIAL_ARG, Recipe, evaluate_model, run_method, sft_examples,
                                     task_collator, trainer_class, training_args)
from epi.models import load_model
from epi.models.shapes import save_random_model
from epi.tasks import generate

TASKS = ("math", "logic")
STEPS, MICRO, ACCUM = 6, 2, 2


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A random-init Qwen2 (the GPU profile's architecture, tiny) on two EPI-Mini tasks, read in blocks."""
    torch.set_num_threads(1)
    folder = save_random_model("qwen2-tiny", tmp_path_factory.mktemp("model"))
    _, tokenizer = load_model(str(folder))
    examples = {t: sft_examples(t, generate(t, 16, seed=0), tokenizer, 96) for t in TASKS}
    held = {t: generate(t, 2, seed=1, split="test") for t in TASKS}
    return Recipe(
        load_base=lambda: load_model(str(folder)), train_order=task_blocks(examples, MICRO * ACCUM, seed=0),
        collator=task_collator(tokenizer),
        evaluate=lambda m: evaluate_model(m, tokenizer, held, precision="fp32", device="cpu", max_new_tokens=4),
        epi_config=lambda scope: EPIConfig(scope=scope, ratio=0.1, warmup_steps=2, refresh_every=2),
        output_dir=tmp_path_factory.mktemp("trainer"), max_steps=STEPS, micro_batch=MICRO, grad_accum=ACCUM,
        lr=1e-3, weight_decay=0.1, clip=1.0, precision="fp32", seed=0, cuda=False)


def test_training_arguments_build_on_this_transformers_version(tmp_path):
    args = training_args(tmp_path, max_steps=3, micro_batch=2, grad_accum=2, lr=1e-3, weight_decay=0.1, clip=1.0,
                         precision="fp32", seed=0, cuda=False, checkpointing=True, save_steps=2)
    assert args.gradient_accumulation_steps == 2 and args.save_steps == 2 and not args.bf16 and not args.fp16
    # transformers 5: the Trainer's own sequential sampling; 4.x: InOrderTrainer reads in order instead
    assert getattr(args, "train_sampling_strategy", "sequential") == "sequential"
    assert (trainer_class("callback").__name__ == "Trainer") == SEQUENTIAL_ARG
    assert trainer_class("mixin").__name__ == "EPITrainer" and trainer_class("mixin", epi=False) is trainer_class()


def test_per_task_epi_through_the_recipe_is_exact_and_follows_the_block_order(recipe):
    result, state = run_method(recipe, "epi_per_task")
    block = MICRO * ACCUM
    order = [recipe.train_order[(s % (len(recipe.train_order) // block)) * block]["task"] for s in range(STEPS)]
    assert result["steps"] == result["engine_steps"] == STEPS
    assert result["spy_tasks"] == order
    assert result["isolated_steps"] == STEPS - 2 and max(result["drift"]) == 0.0
    assert set(state["sets"]) == set(TASKS) and state["step"] == STEPS
    assert set(result["scores"]) == set(TASKS)


def test_full_sft_has_no_engine(recipe):
    result, state = run_method(recipe, "full_sft")
    assert state is None and "drift" not in result and result["steps"] == STEPS
    with pytest.raises(ValueError, match="choose from full_sft, epi, epi_per_task"):
        run_method(recipe, "ewc")
    assert list(METHODS) == ["full_sft", "epi", "epi_per_task"]


def test_a_finished_method_is_saved_at_once_and_skipped_on_rerun(recipe, tmp_path):
    settings = {"model": "qwen2-tiny", "steps": STEPS, "seed": 0}
    runs = []

    def run():
        runs.append(1)
        result, state = run_method(recipe, "epi")
        return {**result, "peak_gib": float("nan")}, state

    first, loaded = run_or_load(tmp_path, "epi", settings, run)
    assert not loaded and runs == [1]
    assert (tmp_path / "epi" / ENGINE_STATE).is_file()
    saved = json.loads((tmp_path / "epi" / RESULT).read_text())  # strict JSON: NaN was written as null
    assert saved["result"]["peak_gib"] is None and saved["settings"] == settings
    again, loaded = run_or_load(tmp_path, "epi", settings, run)
    assert loaded and runs == [1] and again == first  # not trained again; the same structure either way
    state = torch.load(tmp_path / "epi" / ENGINE_STATE, weights_only=True)
    assert state["step"] == STEPS and "global" in state["sets"]
    with pytest.raises(ValueError, match=r"other settings \(steps: saved 6 vs now 7\)"):
        load_result(tmp_path, "epi", {**settings, "steps": 7})
    assert load_result(tmp_path, "epi_per_task", settings) is None  # not finished: run it
    assert all(not isinstance(v, float) or math.isfinite(v) for v in again.values())
