"""Token-length histogram of a real prompt set, for ``clipfast bench text``.

Source: the 80,000 zero-shot ImageNet prompts of OpenAI CLIP's evaluation (the 1,000 ImageNet class names
times the 80 prompt templates, ``IMAGENET_CLASSNAMES`` and ``OPENAI_IMAGENET_TEMPLATES`` as shipped in
open_clip 3.3's ``open_clip/zero_shot_metadata.py``), each tokenized with CLIP's BPE tokenizer
(``open_clip.tokenizer.SimpleTokenizer``, the vocabulary shipped with open_clip) and counted with its
start- and end-of-text tokens, capped at the 77-token context. ``regenerate()`` recomputes it (about a
minute on one CPU core). Mean length 9.6 tokens.

This is an inference mix (zero-shot classification prompts): training captions are longer, so it is a
best case for unpadding; ``clipfast bench text`` also reports all-77 prompts (the worst case).
"""
from __future__ import annotations

#: tokens per prompt (start- and end-of-text included) -> number of prompts
IMAGENET_PROMPT_LENGTHS = {
    6: 2460, 7: 6556, 8: 10502, 9: 20500, 10: 19462, 11: 9256, 12: 6234, 13: 3078, 14: 1128, 15: 500,
    16: 166, 17: 72, 18: 44, 19: 28, 20: 6, 21: 6, 22: 2,
}
SOURCE = ("OpenAI CLIP zero-shot ImageNet prompts (1000 classes x 80 templates, open_clip 3.3 "
          "zero_shot_metadata.py), CLIP BPE token counts with start/end-of-text")


def regenerate(context_length: int = 77) -> dict[int, int]:
    """The histogram above, recomputed from open_clip's shipped prompt lists and tokenizer."""
    from collections import Counter

    from open_clip.tokenizer import SimpleTokenizer
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    tokenizer = SimpleTokenizer()
    counts = Counter(min(len(tokenizer.encode(template(name))) + 2, context_length)
                     for name in IMAGENET_CLASSNAMES for template in OPENAI_IMAGENET_TEMPLATES)
    return dict(sorted(counts.items()))
