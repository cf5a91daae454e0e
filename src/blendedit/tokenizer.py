"""Build a real CLIP BPE tokenizer offline for a small word list.

CLIP's tokenizer is byte-level BPE: every byte is a base symbol (with a ``</w>`` variant that ends
a word), and merges build longer symbols. Learning merges on the word list yields a genuine
``CLIPTokenizer`` in which listed words are one token each and any other text still tokenizes
(in pieces, down to single bytes). Used by the tiny test models and the Shapes World models.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes that GPT-2/CLIP byte-level BPE uses."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in printable]
    codes = {b: b for b in printable} | {b: 256 + i for i, b in enumerate(extra)}
    return [chr(codes[b]) for b in range(256)]


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges learned as BPE training does (most frequent pair first, ties broken by
    the pair itself), until every word is one symbol. Applying them in order (as the tokenizer
    does) reproduces these segmentations, so every listed word encodes to a single token."""
    segs = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(x.lower() for x in words))]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seg in segs:
            for pair in zip(seg, seg[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for k, seg in enumerate(segs):
            out, i = [], 0
            while i < len(seg):
                if i + 1 < len(seg) and (seg[i], seg[i + 1]) == best:
                    out.append(seg[i] + seg[i + 1])
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            segs[k] = out


def write_clip_vocab(words: list[str], folder: str | Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` for ``words`` (lower-case ASCII) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in base + [s + "</w>" for s in base]:
        vocab.setdefault(s, len(vocab))
    learned = _learn_merges(words)
    for pair in learned:
        vocab.setdefault("".join(pair), len(vocab))
    merges = [" ".join(pair) for pair in learned]
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab))
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path


def build_clip_tokenizer(words: list[str], folder: str | Path | None, max_length: int = 77):
    """A ``CLIPTokenizer`` for ``words``, saved to ``folder`` (loadable by ``from_pretrained``);
    with ``folder`` None, built in a temporary folder that is removed again (the tokenizer is
    held in memory once loaded)."""
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="blendedit-tok-") as tmp:
            return build_clip_tokenizer(words, tmp, max_length)
    vocab_path, merges_path = write_clip_vocab(words, folder)
    tok = CLIPTokenizer(vocab=str(vocab_path), merges=str(merges_path), model_max_length=max_length)
    tok.save_pretrained(str(folder))
    return tok


def build_t5_like_tokenizer(words: list[str], max_length: int = 256):
    """A T5-style tokenizer (``PreTrainedTokenizerFast``) for tiny test models, built offline
    with the ``tokenizers`` library: one id per listed word (lower-cased, split on whitespace
    and punctuation), ``<unk>`` for anything else, ``</s>`` appended, ``<pad>`` = 0 as T5's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words) - set(specials)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
    )
