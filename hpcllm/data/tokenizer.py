"""Tokenizers: raw UTF-8 bytes (nothing to train) or byte-level BPE trained on the corpus.

Both expose `name` (stored in each shard's `tokenizer` attribute), `vocab_size`, `eot_id`,
`encode(text) -> np.ndarray` of int64 ids without an EOT, and `decode(ids) -> str`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

from hpcllm.data.shards import PREPARE_HINT, DataError, read_regular

EOT_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
# Longest pre-token (in bytes) BPE learns merges within. A run without whitespace or
# punctuation (minified code, base64, DNA) is otherwise one pre-token, and BPE training
# rescans a word for every merge it learns in it: quadratic in the run's length.
MAX_PRETOKEN_BYTES = 64


def _as_array(ids) -> np.ndarray:
    """Token ids from a list, numpy array or (possibly GPU) torch tensor, as a flat numpy array."""
    if hasattr(ids, "cpu"):
        ids = ids.cpu()
    return np.asarray(ids).ravel()


class ByteTokenizer:
    """Each UTF-8 byte is a token (0..255); 256 is the end-of-text token."""

    name = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        ids = _as_array(ids)
        # Drops EOT; a window cut mid-character decodes to U+FFFD rather than failing.
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """Bytes of text each id stands for (the EOT: none); bits per byte divide by these."""
        lengths = np.ones(self.vocab_size, dtype=np.int64)
        lengths[self.eot_id] = 0
        return lengths


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) from the `tokenizers` package, with `<|endoftext|>` as EOT."""

    name = "bpe"

    def __init__(self, tokenizer):
        # The literal text "<|endoftext|>" inside a document must stay text, not become EOT.
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.eot_id = tokenizer.token_to_id(EOT_TOKEN)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn merges from `texts` up to `vocab_size` ids (fewer if the corpus runs out of pairs)."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

        # 256 byte symbols + EOT must fit before any merge is learned.
        if vocab_size < 257:
            raise ValueError(
                f"BPE vocab_size must be at least 257 (256 bytes + EOT), got {vocab_size}"
            )
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.ByteLevel(add_prefix_space=False),
                # Cut what ByteLevel left (one character per byte) into pieces of at most
                # MAX_PRETOKEN_BYTES; a token never spans two pieces.
                pre_tokenizers.Split(Regex(f".{{1,{MAX_PRETOKEN_BYTES}}}"), behavior="isolated"),
            ]
        )
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT_TOKEN],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    def save(self, path) -> None:
        """Write the tokenizer as JSON, atomically (other ranks may be waiting to load it)."""
        tmp = os.fspath(path) + ".tmp"
        self._tokenizer.save(tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> BPETokenizer:
        """The tokenizer saved at `path`; DataError naming the file if `save` cannot have written it."""
        from tokenizers import Tokenizer, models

        path = os.fspath(path)
        again = (
            f"it is damaged or was not written by hpcllm.data.prepare; "
            f"{PREPARE_HINT.format(os.path.dirname(path) or '.')} --tokenizer bpe --overwrite"
        )
        try:
            tokenizer = Tokenizer.from_str(read_regular(path).decode("utf-8"))
        except OSError as e:
            raise DataError(f"{path} cannot be read: {e.strerror}") from e
        except DataError as e:
            raise DataError(f"{e}; {again}") from e
        except Exception as e:  # tokenizers raises a bare Exception for text it cannot parse
            raise DataError(f"{path} is not a tokenizer ({e}); {again}") from e
        if not isinstance(tokenizer.model, models.BPE):
            raise DataError(
                f"{path} holds a {type(tokenizer.model).__name__} model, not BPE; {again}"
            )
        vocab_size = tokenizer.get_vocab_size()
        ids = sorted(tokenizer.get_vocab().values())
        if ids != list(range(vocab_size)):
            # An id past the end would index outside the embedding; a gap or a repeat
            # would make vocab_size (the model's width) disagree with the ids.
            raise DataError(
                f"{path} has {len(ids)} tokens with ids from {ids[0] if ids else None} to "
                f"{ids[-1] if ids else None} but a vocabulary of {vocab_size}: ids must be "
                f"0..{vocab_size - 1}, each once; {again}"
            )
        if tokenizer.token_to_id(EOT_TOKEN) is None:
            raise DataError(f"{path} has no {EOT_TOKEN} token; {again}")
        return cls(tokenizer)

    def encode(self, text: str) -> np.ndarray:
        return np.array(self._tokenizer.encode(text).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self._tokenizer.decode(_as_array(ids).tolist())

    def token_bytes(self) -> np.ndarray:
        """Bytes of text each id stands for (special tokens: none).

        A byte-level token's string has one character per byte it encodes (GPT-2's byte to
        character map), so its length is the byte count, even for a piece of a UTF-8 character.
        """
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        special = {t.content for t in self._tokenizer.get_added_tokens_decoder().values()}
        for token, i in self._tokenizer.get_vocab().items():
            if token not in special:
                lengths[i] = len(token)
        return lengths


def load_tokenizer(data_dir, name: str) -> ByteTokenizer | BPETokenizer:
    """The tokenizer a data directory's shards were written with (`name` is their `tokenizer` attribute)."""
    if name == ByteTokenizer.name:
        return ByteTokenizer()
    if name == BPETokenizer.name:
        path = os.path.join(os.fspath(data_dir), TOKENIZER_FILE)
        if not os.path.lexists(path):
            raise DataError(
                f"{path} is missing but the shards in {data_dir} were written with the BPE "
                f"tokenizer; {PREPARE_HINT.format(data_dir)} --tokenizer bpe --overwrite"
            )
        return BPETokenizer.load(path)
    raise DataError(
        f"unknown tokenizer '{name}' for the shards in {data_dir} (expected 'byte' or 'bpe')"
    )
