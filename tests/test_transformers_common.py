"""transformers' own common suites against GranAlign, set up the way `tests/models/clip/` sets up CLIP.

`ModelTesterMixin` + `ConfigTester` run for a pixel tower (ViT + BERT) and for precomputed regions (+ BERT);
`ProcessorTesterMixin` runs in tests/test_transformers_processor.py. The suites come from the installed
transformers release's sdist (tests/transformers_suite.py). A test is skipped only where CLIP's
`CLIPModelTest` skips it, with CLIP's reason.
"""

from __future__ import annotations

import unittest

import numpy as np
import torch
from transformers_suite import common_suite

from granalign import GranAlignConfig, GranAlignModel

modeling_common = common_suite("test_modeling_common")
configuration_common = common_suite("test_configuration_common")
ModelTesterMixin = modeling_common.ModelTesterMixin
ConfigTester = configuration_common.ConfigTester

VISION = {
    "model_type": "vit",
    "image_size": 30,
    "patch_size": 2,
    "num_channels": 3,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "initializer_range": 0.02,
}
TEXT = {
    "model_type": "bert",
    "vocab_size": 99,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "initializer_range": 0.02,
}


class GranAlignModelTester:
    """Config and inputs for the common tests (CLIPModelTester's sizes: batch 12, captions of 7 tokens)."""

    def __init__(self, parent: unittest.TestCase, regions: bool = False, batch_size: int = 12) -> None:
        self.parent = parent
        self.regions = regions
        self.batch_size = batch_size
        self.seq_length = 7
        self.num_regions = 6
        self.region_feature_dim = 24
        self.is_training = True
        # read by the suite's get_*_features tests: both towers have this many layers
        self.num_hidden_layers = TEXT["num_hidden_layers"]
        self.vision_config = VISION

    def get_config(self) -> GranAlignConfig:
        image_side = (
            {"region_feature_dim": self.region_feature_dim} if self.regions else {"vision_config": VISION}
        )
        return GranAlignConfig(text_config=TEXT, embed_dim=32, num_regions=3, **image_side)

    def prepare_config_and_inputs(self) -> tuple[GranAlignConfig, dict]:
        input_ids = modeling_common.ids_tensor([self.batch_size, self.seq_length], TEXT["vocab_size"])
        attention_mask = torch.ones_like(input_ids)
        starts = np.random.randint(1, self.seq_length - 1, size=(self.batch_size,))
        for row, start in enumerate(starts):  # right padding, as CLIP's tester
            attention_mask[row, start:] = 0
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.regions:
            inputs["region_features"] = modeling_common.floats_tensor(
                [self.batch_size, self.num_regions, self.region_feature_dim]
            )
            inputs["region_mask"] = torch.ones(self.batch_size, self.num_regions, dtype=torch.long)
        else:
            size = VISION["image_size"]
            inputs["pixel_values"] = modeling_common.floats_tensor([self.batch_size, 3, size, size])
        return self.get_config(), inputs

    def prepare_config_and_inputs_for_common(self) -> tuple[GranAlignConfig, dict]:
        config, inputs = self.prepare_config_and_inputs()
        return config, {**inputs, "return_loss": True}

    @property
    def vision_model_tester(self) -> _RegionInputs | None:
        """Region models' image inputs for the suite's get_image_features tests (it looks for pixel keys)."""
        if not self.regions:
            raise AttributeError("vision_model_tester")  # pixel models: the suite picks pixel_values itself
        return _RegionInputs(self)

    def create_and_check_model(self, config: GranAlignConfig, inputs: dict) -> None:
        model = GranAlignModel(config).eval()
        with torch.no_grad():
            result = model(**inputs)
        shape = (self.batch_size, self.batch_size)
        self.parent.assertEqual(result.logits_per_image.shape, shape)
        self.parent.assertEqual(result.logits_per_text.shape, shape)


class _RegionInputs:
    """The image half of a region model's inputs."""

    def __init__(self, tester: GranAlignModelTester) -> None:
        self.tester = tester

    def prepare_config_and_inputs_for_common(self) -> tuple[GranAlignConfig, dict]:
        config, inputs = self.tester.prepare_config_and_inputs()
        return config, {key: inputs[key] for key in ("region_features", "region_mask")}


class _GranAlignCommonTests(ModelTesterMixin):
    """CLIPModelTest's settings and skips; the subclasses choose the image side."""

    all_model_classes = (GranAlignModel,)
    additional_model_inputs = ("pixel_values", "region_features", "region_mask")
    test_resize_embeddings = False
    test_attention_outputs = False
    _is_composite = True
    regions = False

    def setUp(self) -> None:
        self.model_tester = GranAlignModelTester(self, regions=self.regions)
        self.config_tester = ConfigTester(
            self,
            config_class=GranAlignConfig,
            has_text_modality=False,
            common_properties=["embed_dim", "num_regions"],
            **({"region_feature_dim": 24} if self.regions else {}),  # else the default config, as CLIP
        )

    def test_model(self) -> None:
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_config(self) -> None:
        self.config_tester.run_common_tests()

    @unittest.skip(reason="Hidden_states is tested in individual model tests")
    def test_hidden_states_output(self):
        pass

    @unittest.skip(reason="Inputs_embeds is tested in individual model tests")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="Retain_grad is tested in individual model tests")
    def test_retain_grad_hidden_states_attentions(self):
        pass

    @unittest.skip(reason="CLIPModel does not have input/output embeddings")
    def test_model_get_set_embeddings(self):
        pass

    def test_sdpa_can_dispatch_on_flash(self):
        self.skipTest(
            reason="CLIP text tower has two attention masks: `causal_attention_mask` and `attention_mask`"
        )

    def test_sdpa_can_compile_dynamic(self):
        self.skipTest(reason="CLIP model can't be compiled dynamic, error in clip_loss`")


class GranAlignPixelModelTest(_GranAlignCommonTests, unittest.TestCase):
    regions = False


class GranAlignRegionModelTest(_GranAlignCommonTests, unittest.TestCase):
    """Precomputed regions: no vision tower (CLIP has no such variant; these are the only extra skips)."""

    regions = True
    skip_test_image_features_output_shape = True  # the suite reads the batch size from pixel inputs
    _NO_TOWER = "precomputed regions: there is no vision tower, hence no image hidden states or attentions"

    @unittest.skip(reason=_NO_TOWER)
    def test_get_image_features_hidden_states(self):
        pass

    @unittest.skip(reason=_NO_TOWER)
    def test_get_image_features_attentions(self):
        pass
