"""A byte-level BPE tokenizer trained from scratch with the ``tokenizers`` library.

Contracts of the tokenizer ``train_tokenizer`` returns:

* One special token, ``<|endoftext|>`` (id 0), is the eos, bos, pad and unk token.
  Nothing is added when encoding: ``encode("hello")`` gives only BPE tokens (no bos,
  no eos); documents are separated by eos when training.
* Byte-level: every string encodes (no unk ever appears) and
  ``decode(encode(s)) == s`` for any text without the special token string.
* ``padding_side`` is "left", as batched generation with a decoder-only model needs.
* A simple chat template (:data:`CHAT_TEMPLATE`), for chat requests.
* Saves and loads with ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
#: The built tokenizer's chat template (Jinja, as ``apply_chat_template`` reads it):
#: one "role: content" line per turn, then "assistant:" for the reply.
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with ``vocab_size`` entries (256 bytes + 1 special + merges).

    Deterministic for the same texts. ``vocab_size`` must be at least 257; the vocab
    can come out smaller when the texts do not have enough distinct pairs to merge.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + {EOS_TOKEN}), got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    # add_prefix_space=False: "hello" and " hello" stay different, so decode(encode(s))
    # gives s back exactly (no space invented at the start).
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],  # first, so it gets id 0
        # All 256 bytes from the start, so unseen bytes still encode.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        # The default cleanup rewrites " ." to "." and would break the round trip.
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
