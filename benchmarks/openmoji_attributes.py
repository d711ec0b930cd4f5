"""Can a model tell an emoji's skin-tone variants apart? A fine-grained probe on OpenMoji folds.

OpenMoji annotates skin-tone variants compositionally ("man police officer: medium-dark skin tone",
"men wrestling: medium-light skin tone, light skin tone"). For every test caption of a fold that names a
skin tone, the gallery is every image of the whole dataset (any split) of the same emoji family: the
images whose caption is the same once the skin-tone phrases are removed (on average about 10). The
probe counts how often the caption's own image ranks first among them, for each saved model of the fold
(`<fold dir>/<variant>-seed<s>/best`, as `real_data.py --recipe configs/openmoji-minilm.yaml --folds K`
writes them), with the chance level beside it.

    python benchmarks/openmoji_attributes.py runs/real_data/openmoji_A/fold0 --fold 0 \\
        --set data.source=/path/to/openmoji/package
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

import torch
from datasets import concatenate_datasets

from granalign.evaluation.runner import caption_index
from granalign.modeling_granalign import GranAlignModel
from granalign.retrieval.encode import encode_captions, encode_dataset_images
from granalign.training.builders import build_model, build_processor, load_recipe_splits
from granalign.training.recipe import load_recipe
from granalign.training.tower_cache import build_split_states

SKIN_TONE = re.compile(r"(,\s*)?\b(light|medium-light|medium|medium-dark|dark) skin tone")


def family(caption: str) -> str:
    """The caption without its skin-tone phrases: the key shared by an emoji's skin-tone variants."""
    return SKIN_TONE.sub("", caption).strip(" :,")


@torch.no_grad()
def variant_accuracy(model: GranAlignModel, processor, gallery, gallery_states, test, test_states) -> tuple:
    """`(accuracy %, chance %, number of queries)` of the skin-tone probe for one model."""
    gallery_captions = [row[0] for row in gallery["captions"]]
    families = collections.defaultdict(list)
    for row, caption in enumerate(gallery_captions):
        families[family(caption)].append(row)
    own = {caption: row for row, caption in enumerate(gallery_captions)}
    captions, _ = caption_index(test)
    queries = [
        (column, caption)
        for column, caption in enumerate(captions)
        if "skin tone" in caption and len(families[family(caption)]) > 1
    ]
    if not queries:
        raise ValueError("no test caption names a skin tone with variants in the data: is this OpenMoji?")
    images, _ = encode_dataset_images(
        model,
        processor,
        gallery,
        64,
        False,
        None,
        rows=range(len(gallery)),
        image_states=gallery_states.images,
    )
    texts = encode_captions(model, processor, captions, 64, False, None, test_states.texts, 0)
    scores = model.score(images, texts)  # [N_gallery, N_test_captions]
    hits = 0
    for column, caption in queries:
        rows = torch.tensor(families[family(caption)])
        hits += int(rows[scores[rows, column].argmax()].item() == own[caption])
    chance = sum(1 / len(families[family(c)]) for _, c in queries)
    return 100 * hits / len(queries), 100 * chance / len(queries), len(queries)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("fold_dir", help="a fold's output folder of real_data.py (holds <variant>-seed<s>/)")
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--recipe", default="configs/openmoji-minilm.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    args = parser.parse_args()
    runs = sorted(Path(args.fold_dir).glob("*-seed*/best"))
    if not runs:
        raise SystemExit(f"{args.fold_dir!r} holds no saved models (<variant>-seed<s>/best) of real_data.py")
    recipe = load_recipe(args.recipe, [*args.set, f"data.args.fold={args.fold}"])
    train, dev, test, _ = load_recipe_splits(recipe.data)
    processor = build_processor(recipe.model, train)
    towers = build_model(recipe.model, processor.tokenizer)
    m = recipe.model
    gallery = concatenate_datasets([train, dev, test])

    def states(split):
        return build_split_states(
            towers, processor, split, True, True, m.tower_cache_dir, m.tower_cache_dtype
        )

    gallery_states, test_states = states(gallery), states(test)
    for run in runs:
        model = GranAlignModel.from_pretrained(run).eval()
        accuracy, chance, count = variant_accuracy(
            model, processor, gallery, gallery_states, test, test_states
        )
        print(
            f"{run.parent.name}: skin-tone variant accuracy {accuracy:.1f} % (chance {chance:.1f} %, {count} captions)"
        )


if __name__ == "__main__":
    main()
