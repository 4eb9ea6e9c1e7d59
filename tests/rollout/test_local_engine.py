"""The in-process engine: batched seeded sampling whose log-probs equal teacher-forced ones."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from pipeline.rollout import LocalEngine, SamplingParams
from pipeline.tiny import char_tokenizer


def tiny_qwen2(vocab, seed=0, tie=True):
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    return Qwen2ForCausalLM(cfg).float()


@pytest.fixture(scope="module")
def engine():
    tok = char_tokenizer()
    return LocalEngine(tiny_qwen2(len(tok)), tok, seed=1)


def prompts(tok):
    texts = ["1+2=?", "12*3=?", "7-4=", "100/5 = ?"]  # different lengths: left padding matters
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.mark.parametrize("temperature, top_k", [(1.0, -1), (0.7, -1), (1.0, 5)])
def test_sample_logprobs_equal_teacher_forced_logprobs(engine, temperature, top_k):
    ps = prompts(engine.tokenizer)
    samples = engine.generate(
        ps, SamplingParams(max_new_tokens=12, temperature=temperature, top_k=top_k, seed=3)
    )
    assert [s.prompt_ids for s in samples] == ps
    tf = engine.logprobs([s.prompt_ids + s.response_ids for s in samples], [len(p) for p in ps], temperature)
    for s, ref in zip(samples, tf):
        assert len(s.response_ids) == len(s.logprobs) > 0
        if top_k < 0:  # with top-k the sampling distribution is renormalised; teacher forcing is not
            assert max(abs(a - b) for a, b in zip(s.logprobs, ref)) < 1e-5
        assert s.finish_reason in ("stop", "length") and s.weight_version == 0


def test_same_seed_same_samples_and_length_finish(engine):
    ps = prompts(engine.tokenizer)
    a = engine.generate(ps, SamplingParams(max_new_tokens=6, seed=11))
    b = engine.generate(ps, SamplingParams(max_new_tokens=6, seed=11))
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    assert all(
        s.finish_reason == "length" and len(s.response_ids) == 6 for s in a if s.finish_reason != "stop"
    )


def test_stop_tokens_end_a_response_and_padding_continues_the_rest(engine):
    vocab = len(engine.tokenizer)
    ps = prompts(engine.tokenizer)
    every = SamplingParams(max_new_tokens=20, stop_token_ids=list(range(vocab)), seed=0)
    samples = engine.generate(ps, every)  # whatever is sampled first is a stop token
    assert all(s.finish_reason == "stop" and len(s.response_ids) == 1 for s in samples)
    none = SamplingParams(max_new_tokens=7, seed=0)
    eng = LocalEngine(engine.model, engine.tokenizer, eos_token_ids=[-1])  # nothing can stop it
    assert all(s.finish_reason == "length" and len(s.response_ids) == 7 for s in eng.generate(ps, none))


def test_update_weights_switches_model_and_version():
    tok = char_tokenizer()
    eng = LocalEngine(tiny_qwen2(len(tok), seed=0), tok)
    other = tiny_qwen2(len(tok), seed=1)
    ps = prompts(tok)
    seq = [p + [10, 11, 12] for p in ps]
    before = eng.logprobs(seq, [len(p) for p in ps])
    eng.update_weights(((k, v) for k, v in other.state_dict().items() if k != "lm_head.weight"), version=3)
    after = eng.logprobs(seq, [len(p) for p in ps])
    ref = LocalEngine(other, tok).logprobs(seq, [len(p) for p in ps])
    assert eng.weight_version == 3
    assert after == ref and after != before
    with pytest.raises(KeyError, match="unknown tensor"):
        eng.update_weights([("nope", torch.zeros(1))], version=4)
    with pytest.raises(ValueError, match="shape"):
        eng.update_weights([("model.norm.weight", torch.zeros(3))], version=4)
    with pytest.raises(ValueError, match="no values"):
        eng.update_weights([("model.norm.weight", torch.zeros(32))], version=4)


def test_release_then_generate_is_a_clear_error(engine):
    engine.release_memory()
    try:
        assert not engine.health()
        with pytest.raises(RuntimeError, match="resume_memory"):
            engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    finally:
        engine.resume_memory()
    assert engine.health()
