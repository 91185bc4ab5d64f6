"""The demo tokenizer: one token per ASCII byte (ids 0..127), a real ``tokenizers`` model.

It is saved with ``save_pretrained`` next to each demo model, so the pipeline loads it with
``AutoTokenizer.from_pretrained(dir)`` offline like any hub tokenizer. No special tokens are added
on encode (there is no BOS/EOS in the demo models); characters outside ASCII map to id 0.
"""

from __future__ import annotations

VOCAB_SIZE = 128
UNKNOWN = chr(0)


def byte_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(VOCAB_SIZE)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNKNOWN))
    # Every character is its own pre-token, whitespace and newlines included.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token=UNKNOWN, model_max_length=1 << 16)


def encode(text: str) -> list[int]:
    """Token ids without building a tokenizer (same mapping as ``byte_tokenizer``)."""
    return [o if o < VOCAB_SIZE else 0 for o in map(ord, text)]
