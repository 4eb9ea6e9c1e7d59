"""Tiny tokenizers made locally (no model hub): for the CPU demo and the tests.

`char_tokenizer()` (a WordLevel model over single characters) and `bpe_tokenizer()` (a byte-level BPE
trained on a corpus) are real `transformers.PreTrainedTokenizerFast`s with special tokens and a chat
template, so every code path that takes a Hugging Face tokenizer runs unchanged on them.
"""

from __future__ import annotations

import string

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def char_tokenizer(alphabet: str | None = None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = alphabet or (string.digits + string.ascii_letters + " +-*/=()?.,:#\\{}\n_")
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    specials = "|".join(s.replace("|", r"\|") for s in SPECIAL)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"{specials}|.|\\n"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join without spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        bos_token=None,
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# Qwen2's pre-tokenizer split (its `tokenizer.json`), with numbers in chunks of up to three digits as
# in Llama 3 / cl100k: letters with one leading non-letter, numbers, punctuation runs, whitespace.
PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def bpe_tokenizer(corpus, vocab_size: int = 4096):
    """A byte-level BPE (Qwen2's pre-tokenizer and special tokens) trained on `corpus` (strings).

    Every number below 1000 is one token (as in Llama 3 / cl100k), whether or not the corpus has it;
    the rest of the vocabulary is merges of the corpus, up to `vocab_size`. Deterministic: the same
    corpus gives the same tokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    numbers = [" ".join(str(n) for n in range(1000))] * 2  # twice: min_frequency
    tok.train_from_iterator([*numbers, *corpus], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        bos_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
