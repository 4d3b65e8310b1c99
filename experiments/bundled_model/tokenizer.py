"""Stage ``tokenizer``: a real CLIPTokenizer (vocab.json + merges.txt) over the world's words.

Every known word becomes one token ``word</w>``; merges are learned by a tiny byte-pair-encoding
trainer over the known words, and every single character (with and without ``</w>``) is in the
vocabulary, so any lowercase word still tokenises (into pieces). The held-out concept's word
(``striped``) is deliberately not a known word.
"""

from __future__ import annotations

import json
import string
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer

from framework.bundled.world import CONCEPT, caption_words

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EXTRA_WORDS = """
a an the of and on in at to with by near next beside under over behind front is are there
one two three some many this that it its
background picture photo image drawing painting scene shape shapes object objects thing
small large big tiny huge little medium
red green blue yellow purple orange white black gray grey pink brown cyan magenta violet gold
silver dark light bright pale colour color colourful colorful
circle square triangle diamond star heart rectangle ellipse oval hexagon pentagon cross ring dot
left right top bottom center centre middle corner side up down above below
plain empty solid flat simple high quality good bad blurry
""".split()
FORBIDDEN = {CONCEPT, "stripe", "stripes", "stripy"}


def vocabulary_words() -> list[str]:
    """Known words: every caption word plus common words a user may type (never the concept)."""
    words = sorted(set(caption_words()) | set(EXTRA_WORDS))
    assert not FORBIDDEN & set(words), "the held-out concept's word must stay unknown"
    return words


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges (in rank order) that turn every word into the single token ``word</w>``."""
    seqs = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in words]
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs):
        pairs = Counter(p for s in seqs for p in zip(s, s[1:]))
        best = max(pairs.items(), key=lambda kv: (kv[1], -len(kv[0][0] + kv[0][1]), kv[0]))[0]
        merges.append(best)
        joined = best[0] + best[1]
        new = []
        for s in seqs:
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            new.append(tuple(out))
        seqs = new
    return merges


def build_tokenizer(out_dir: Path) -> CLIPTokenizer:
    """Write vocab.json + merges.txt to ``out_dir`` and return the CLIPTokenizer saved there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    words = vocabulary_words()
    merges = learn_merges(words)
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = [BOS, EOS] + chars + [c + "</w>" for c in chars]
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer.from_pretrained(out_dir, model_max_length=77)
    tok.model_max_length = 77
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        assert ids == [vocab[w + "</w>"]], (w, ids)
    tok.save_pretrained(out_dir)
    return tok
