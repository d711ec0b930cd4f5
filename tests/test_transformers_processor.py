"""transformers' own `ProcessorTesterMixin` against `GranAlignProcessor`, set up the way transformers'
`tests/models/clip/test_processing_clip.py` sets up `CLIPProcessor`: a `setUpClass` that builds the tokenizer
and the image processor, saves the processor to a temporary directory for the mixin to load, plus CLIP's own
checks (save/load, image processor, tokenizer, keys, decode) in GRM's terms.

The suite comes from the installed transformers release's sdist (tests/transformers_suite.py). Offline: a
tiny WordPiece tokenizer (tests/tiny_configs.py) and a CLIP image processor built in place. Nothing is
skipped here beyond what the mixin skips by itself, as for CLIP (video, audio and chat-template tests: the
processor has none of those). The region variant (no image processor) is not run through the mixin, which
loads an image processor for every processor that declares one; tests/test_processor.py covers it.
"""

from __future__ import annotations

import shutil
import tempfile
import unittest
from pathlib import Path

import numpy as np
import transformers
from tiny_configs import tiny_tokenizer
from transformers import AutoTokenizer
from transformers_suite import common_suite

from granalign import GranAlignProcessor

processing_common = common_suite("test_processing_common")
ProcessorTesterMixin = processing_common.ProcessorTesterMixin

# Without torchvision, transformers 5 maps `CLIPImageProcessor` to the PIL backend with a warning.
CLIPImageProcessor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)


class GranAlignProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = GranAlignProcessor

    @classmethod
    def setUpClass(cls):
        cls.tmpdirname = tempfile.mkdtemp()
        cls.full_tmpdirname = None  # no separate full-size checkpoint (the mixin's get_processor reads it)
        vocab_dir = Path(tempfile.mkdtemp())
        tokenizer = tiny_tokenizer(vocab_dir)
        shutil.rmtree(vocab_dir)
        image_processor = CLIPImageProcessor(
            do_resize=True,
            size={"shortest_edge": 20},
            do_center_crop=True,
            crop_size={"height": 18, "width": 18},
            do_normalize=True,
            image_mean=[0.48145466, 0.4578275, 0.40821073],
            image_std=[0.26862954, 0.26130258, 0.27577711],
        )
        processor = GranAlignProcessor(image_processor=image_processor, tokenizer=tokenizer)
        processor.save_pretrained(cls.tmpdirname)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmpdirname, ignore_errors=True)

    # -- CLIPProcessorTest's own checks, with GRM's defaults ---------------------------------------------

    def test_save_load_pretrained_default(self):
        tokenizer, image_processor = self.get_component("tokenizer"), self.get_component("image_processor")
        with tempfile.TemporaryDirectory() as tmpdir:
            GranAlignProcessor(tokenizer=tokenizer, image_processor=image_processor).save_pretrained(tmpdir)
            processor = GranAlignProcessor.from_pretrained(tmpdir)
        self.assertEqual(processor.tokenizer.get_vocab(), tokenizer.get_vocab())
        self.assertEqual(processor.image_processor.to_json_string(), image_processor.to_json_string())
        self.assertIsInstance(processor.image_processor, CLIPImageProcessor)
        self.assertEqual(processor.max_length, 32)

    def test_save_load_pretrained_additional_features(self):
        with tempfile.TemporaryDirectory() as tmpdir:
            GranAlignProcessor(
                tokenizer=self.get_component("tokenizer"),
                image_processor=self.get_component("image_processor"),
            ).save_pretrained(tmpdir)
            tokenizer_add_kwargs = AutoTokenizer.from_pretrained(tmpdir, bos_token="(BOS)", eos_token="(EOS)")
            image_processor_add_kwargs = CLIPImageProcessor.from_pretrained(
                tmpdir, do_normalize=False, padding_value=1.0
            )
            processor = GranAlignProcessor.from_pretrained(
                tmpdir, bos_token="(BOS)", eos_token="(EOS)", do_normalize=False, padding_value=1.0
            )
        self.assertEqual(processor.tokenizer.get_vocab(), tokenizer_add_kwargs.get_vocab())
        self.assertEqual(processor.tokenizer.bos_token, "(BOS)")
        self.assertEqual(
            processor.image_processor.to_json_string(), image_processor_add_kwargs.to_json_string()
        )
        self.assertIsInstance(processor.image_processor, CLIPImageProcessor)

    def test_image_processor(self):
        image_processor = self.get_component("image_processor")
        processor = GranAlignProcessor(
            tokenizer=self.get_component("tokenizer"), image_processor=image_processor
        )
        image_input = self.prepare_images_inputs()
        input_image_proc = image_processor(image_input, return_tensors="np")
        input_processor = processor(images=image_input, return_tensors="np")
        for key in input_image_proc:
            self.assertAlmostEqual(input_image_proc[key].sum(), input_processor[key].sum(), delta=1e-2)

    def test_tokenizer(self):
        """As CLIP's, with GRM's text defaults: padded and truncated to `max_length`, no token type ids,
        torch tensors."""
        tokenizer = self.get_component("tokenizer")
        processor = GranAlignProcessor(
            tokenizer=tokenizer, image_processor=self.get_component("image_processor")
        )
        input_str = "lower newer"
        encoded_processor = processor(text=input_str)
        encoded_tok = tokenizer(
            [input_str],
            padding="max_length",
            truncation=True,
            max_length=processor.max_length,
            return_token_type_ids=False,
            return_tensors="pt",
        )
        self.assertEqual(set(encoded_tok), set(encoded_processor))
        for key in encoded_tok:
            self.assertListEqual(encoded_tok[key].tolist(), encoded_processor[key].tolist())

    def test_processor(self):
        processor = GranAlignProcessor(
            tokenizer=self.get_component("tokenizer"), image_processor=self.get_component("image_processor")
        )
        inputs = processor(text="lower newer", images=self.prepare_images_inputs())
        self.assertSetEqual(set(inputs.keys()), {"input_ids", "attention_mask", "pixel_values"})
        with self.assertRaises(ValueError):  # no input
            processor()

    def test_tokenizer_decode(self):
        tokenizer = self.get_component("tokenizer")
        processor = GranAlignProcessor(
            tokenizer=tokenizer, image_processor=self.get_component("image_processor")
        )
        predicted_ids = [[1, 4, 5, 8, 1, 0, 8], [3, 4, 3, 1, 1, 8, 9]]
        self.assertListEqual(tokenizer.batch_decode(predicted_ids), processor.batch_decode(predicted_ids))

    def test_model_input_names_follow_the_keys_of_a_text_and_image_call(self):
        processor = self.get_processor()
        inputs = processor(text="lower newer", images=self.prepare_images_inputs())
        self.assertListEqual(list(inputs.keys()), processor.model_input_names)
        self.assertIsInstance(inputs["pixel_values"].numpy(), np.ndarray)
