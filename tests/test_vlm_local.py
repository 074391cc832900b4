"""Local verifiers on tiny random transformers models built here: a LLaVA-style chat VLM asked
yes/no, and CLIPScore. Exact answers are not the point with random weights; the contract is."""

from __future__ import annotations

import string

import numpy as np
import pytest

pytest.importorskip("transformers")

from reflectionflow.backends.flux.options import FluxBackendOptions, build_components, validate_options  # noqa: E402
from reflectionflow.backends.vlm.local import CLIPScoreVerifier, LocalModelError, LocalYesNoVerifier  # noqa: E402
from reflectionflow.cli import one_line  # noqa: E402
from reflectionflow.components import Verdict  # noqa: E402

PROMPTS = ["a photo of a red circle", "a photo of two squares", "a photo of a blue ring"]


def _images(n=3):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    words = ["Yes", "No", "yes", "no", "USER:", "ASSISTANT:"] + list(string.ascii_letters + string.digits + ".,:\"-")
    vocab = {w: i for i, w in enumerate(specials + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", additional_special_tokens=["<image>"])
    template = ("{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 28},
                                                             crop_size={"height": 28, "width": 28}),
                          tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          chat_template=template, num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=28, patch_size=14, hidden_size=32,
                           intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=0),
        image_token_index=vocab["<image>"], vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llava")
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    proc.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from reflectionflow.backends.flux.random_init import tiny_tokenizers

    tok, _ = tiny_tokenizers()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                         max_position_embeddings=77),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                           num_hidden_layers=2),
        projection_dim=16)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).save_pretrained(path)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(path)
    return path


def test_local_yesno_verifier(tiny_llava):
    v = LocalYesNoVerifier(str(tiny_llava), device="cpu", batch_size=2)
    images = _images()
    out = v.score(images, PROMPTS)
    assert len(out) == 3 and all(isinstance(x, Verdict) for x in out)
    for x in out:
        assert 0.0 < x.score < 1.0 and x.yes == (x.details["p_yes"] > x.details["p_no"]) and x.calls == 0
    # Batching and left padding do not change a row's answer.
    one = v.score(images[1:2], PROMPTS[1:2])[0]
    assert abs(one.score - out[1].score) < 1e-5


def test_clip_score(tiny_clip):
    v = CLIPScoreVerifier(str(tiny_clip), device="cpu")
    images = _images()
    out = v.score(images, PROMPTS)
    assert all(0.0 <= x.score <= 100.0 and -1.0 <= x.details["cosine"] <= 1.0 for x in out)
    assert out[0].score == pytest.approx(max(0.0, 100 * out[0].details["cosine"]))
    assert v.score(images[2:], PROMPTS[2:])[0].score == pytest.approx(out[2].score, abs=1e-4)


def test_local_verifiers_through_the_backend_options(tiny_clip, tiny_llava, tmp_path):
    built = build_components(FluxBackendOptions(verifier="clip", clip_path=str(tiny_clip), device="cpu"),
                             kinds=("verifier",))
    assert isinstance(built["verifier"], CLIPScoreVerifier)
    for opts, words in [
        (FluxBackendOptions(verifier="clip"), "--clip-path"),
        (FluxBackendOptions(verifier="clip", clip_path=str(tmp_path)), "no config.json"),
        (FluxBackendOptions(verifier="clip", clip_path=str(tiny_llava)), "expected clip"),
        (FluxBackendOptions(verifier="local-yesno"), "--local-verifier-path"),
        (FluxBackendOptions(verifier="world-oracle"), "not a flux-backend component"),
    ]:
        with pytest.raises(ValueError) as e:
            validate_options(opts, kinds=("verifier",))
        assert words in one_line(e.value)
    with pytest.raises(LocalModelError):
        LocalYesNoVerifier(str(tmp_path / "missing"))
