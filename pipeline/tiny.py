"""Tiny tokenizers made locally (no model hub): for the CPU demo and the tests.

`char_tokenizer()` is a real `transformers.PreTrainedTokenizerFast` (a WordLevel model over single
characters, with special tokens and a chat template), so every code path that takes a Hugging Face
tokenizer runs unchanged on it.
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
