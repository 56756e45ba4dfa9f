"""/v1/chat/completions with the OpenAI client library, and the answer parsed into regions."""

from __future__ import annotations

import openai
import pytest
import requests

from defectvlm.serve.chat import answer_regions
from tests.serve.conftest import b64, image_bytes


def data_uri(data: bytes) -> str:
    return f"data:image/png;base64,{b64(data)}"


def test_the_openai_client_gets_a_generated_answer_naming_the_model(serve):
    with serve() as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        completion = client.chat.completions.create(
            model="defectvlm",
            max_tokens=6,
            messages=[
                {"role": "system", "content": "Judge each region."},
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_uri(image_bytes())}},
                        {"type": "text", "text": "<regions>\nR1: [0, 0, 20, 20]\nR2: [30, 5, 60, 40]\n</regions>"},
                    ],
                },
            ],
        )
        assert completion.object == "chat.completion"
        answer = completion.choices[0].message.content
        assert isinstance(answer, str) and completion.choices[0].message.role == "assistant"
        assert 1 <= completion.usage.completion_tokens <= 6
        extra = completion.model_extra["defectvlm"]
        assert extra["model"] == {"uri": "base", "version": "base"}
        assert completion.model == "base#base"
        # the untrained base writes no region lines: both regions are reported unanswered
        assert extra["regions"] == [] and extra["unanswered"] == ["R1", "R2"]

        with pytest.raises(openai.UnprocessableEntityError) as refused:  # 4xx, not a crash; and it still serves
            client.chat.completions.create(
                model="defectvlm",
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}],
            )
        assert "data: URI" in str(refused.value)
        image_only = [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image_bytes())}}]}
        ]
        assert client.chat.completions.create(model="m", messages=image_only, max_tokens=2).choices[0].message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}, "stream"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.7}, "temperature"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {}}, "logit_bias"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, "messages: no image_url part"),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,xx"}}]}],
            },
            "not valid base64",
        ),
        (
            {
                "model": "m",
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(b"text")}}]}
                ],
            },
            "messages[0].content[0].image_url: not an image",
        ),
    ],
)
def test_bad_chat_requests_are_4xx_with_a_message(serve, body, message):
    with serve() as url:
        response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert 400 <= response.status_code < 500, response.text
        assert message in response.json()["detail"]


def test_an_answer_in_our_format_is_parsed_into_regions():
    answer = "R2: abnormal | slag\nR1: normal\nR3: abnormal | dust\nOne defect found."
    parsed = answer_regions(answer, ["R1", "R2", "R3", "R4"], ["slag", "streak"])
    assert parsed == {
        "regions": [
            {"id": "R2", "verdict": "abnormal", "cls": "slag"},
            {"id": "R1", "verdict": "normal", "cls": None},
            {"id": "R3", "verdict": "abnormal", "cls": None},
        ],
        "unanswered": ["R4"],
    }
