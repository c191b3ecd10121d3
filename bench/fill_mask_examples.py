"""Issue 12: top-1 `fill_mask` words of pretrained bases on simple sentences, side by side.

    python bench/fill_mask_examples.py --models runs/bert_en_small runs/old --lang en

Prints a markdown table (sentence, then each model's top-1 answers with their probabilities) for the
sentences below, written for this check (not drawn from the training data). A sentence may hold several
[MASK] tokens; each is answered on its own, given the others masked.
"""
from __future__ import annotations

import argparse

from lmforge.checkpoints import load_model
from lmforge.recipes.fill_mask import predict_masks

SENTENCES = {
    "en": [
        "this movie was [MASK] good .",
        "i have never seen a [MASK] film in my life .",
        "the acting was terrible and the plot made no [MASK] .",
        "she is one of the best [MASK] of her generation .",
        "the story takes place in a small [MASK] in texas .",
        "i would [MASK] recommend this movie to anyone .",
        "it was the worst movie i have ever [MASK] .",
        "the special effects were [MASK] for a film made in 1950 .",
        "he plays the role of a young [MASK] who falls in love .",
        "do not waste your [MASK] on this one .",
    ],
    "zh": [
        "中国的首都是[MASK]京。",
        "我今天很高[MASK]。",
        "他毕业于北京[MASK]学。",
        "这家酒店的服务非常[MASK]。",
        "长江是中国最长的[MASK]流。",
        "他是一位著名的[MASK]家。",
        "这部电影讲述了一个[MASK]人的故事。",
        "上海位于中国的[MASK]部。",
        "太阳从东方升[MASK]。",
        "这本书我已经看了三[MASK]了。",
    ],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", required=True, help="runs or checkpoints of BERT bases (mlm)")
    p.add_argument("--names", nargs="*", default=None, help="column names (default: the paths)")
    p.add_argument("--lang", choices=sorted(SENTENCES), default="en")
    args = p.parse_args()
    names = args.names or args.models
    loaded = [load_model(m)[:2] for m in args.models]
    print("| sentence | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for text in SENTENCES[args.lang]:
        cells = []
        for model, tok in loaded:
            answers = predict_masks(model, tok, text, top_k=1)
            cells.append(", ".join(f"{a[0][0]} ({a[0][2]:.2f})" for a in answers))
        print(f"| {text} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
