"""Each tiny instance's chat template renders exactly what the family's published template
(Qwen/Qwen2-VL-7B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct, Qwen/Qwen3-VL-8B-Instruct,
OpenGVLab/InternVL3-8B-hf) renders for the message shapes the project produces: an SFT
sample (system, user with the image and text, the answer), the coords+crops user turn (text
and crops interleaved), a scoring prompt (the answer left to the generation prompt), a serve
request (no system message, text before the image, two user turns, a second system message).

The expected strings are the published templates' output, written out by hand: Qwen2-VL and
Qwen2.5-VL add "You are a helpful assistant." when the conversation opens without a system
message; Qwen3-VL and InternVL3-hf add nothing, and Qwen3-VL renders a system message only
as the first message; images are <|vision_start|><|image_pad|><|vision_end|> (Qwen) and
<IMG_CONTEXT> plus a newline (InternVL); the processor expands them afterwards."""

from __future__ import annotations

import pytest

from tests.models.conftest import FAMILIES, tiny

QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE = {"qwen2_vl": QWEN_IMAGE, "qwen2_5_vl": QWEN_IMAGE, "qwen3_vl": QWEN_IMAGE, "internvl": "<IMG_CONTEXT>\n"}
QWEN2_DEFAULT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
DEFAULT_SYSTEM = {"qwen2_vl": QWEN2_DEFAULT, "qwen2_5_vl": QWEN2_DEFAULT, "qwen3_vl": "", "internvl": ""}

SYSTEM = {"role": "system", "content": "You inspect parts."}
USER = {
    "role": "user",
    "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Any defect?\n<regions>\nR1 [1,2,3,4]"}],
}
ANSWER = {"role": "assistant", "content": "R1: normal"}
CROPS = {
    "role": "user",
    "content": [
        {"type": "image", "image": "a.png"},
        {"type": "text", "text": "Q\n<regions>\n"},
        {"type": "text", "text": "R1 [1,2,3,4] "},
        {"type": "image", "image": "a.png", "crop": [1, 2, 3, 4], "size": 64},
        {"type": "text", "text": "\nR2 [5,6,7,8] "},
        {"type": "image", "image": "a.png", "crop": [5, 6, 7, 8], "size": 64},
        {"type": "text", "text": "\n</regions>"},
    ],
}
SERVE = [
    {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image", "image": "b.png"}]},
    {"role": "assistant", "content": "R1: normal"},
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "And R2?"},
]


def render(name: str, messages: list[dict], generation: bool = False) -> str:
    _, processor = tiny(name)
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


@pytest.mark.parametrize("name", FAMILIES)
def test_sft_sample_renders_as_the_published_template(name):
    img = IMAGE[name]
    assert render(name, [SYSTEM, USER, ANSWER]) == (
        "<|im_start|>system\nYou inspect parts.<|im_end|>\n"
        f"<|im_start|>user\n{img}Any defect?\n<regions>\nR1 [1,2,3,4]<|im_end|>\n"
        "<|im_start|>assistant\nR1: normal<|im_end|>\n"
    )
    assert render(name, [SYSTEM, CROPS, ANSWER]) == (
        "<|im_start|>system\nYou inspect parts.<|im_end|>\n"
        f"<|im_start|>user\n{img}Q\n<regions>\nR1 [1,2,3,4] {img}\nR2 [5,6,7,8] {img}\n</regions><|im_end|>\n"
        "<|im_start|>assistant\nR1: normal<|im_end|>\n"
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_scoring_prompt_renders_as_the_published_template(name):
    assert render(name, [SYSTEM, USER], generation=True) == (
        "<|im_start|>system\nYou inspect parts.<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE[name]}Any defect?\n<regions>\nR1 [1,2,3,4]<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_serve_conversation_without_system_renders_as_the_published_template(name):
    later_system = "" if name == "qwen3_vl" else "<|im_start|>system\nBe brief.<|im_end|>\n"
    assert render(name, SERVE, generation=True) == (
        DEFAULT_SYSTEM[name] + f"<|im_start|>user\nLook:{IMAGE[name]}<|im_end|>\n"
        "<|im_start|>assistant\nR1: normal<|im_end|>\n"
        + later_system
        + "<|im_start|>user\nAnd R2?<|im_end|>\n<|im_start|>assistant\n"
    )
