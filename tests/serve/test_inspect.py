"""POST /v1/inspect: both request forms, every bad input -> its 4xx and message (and the
service keeps serving), health, readiness, metrics and the OpenAPI page."""

from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
import requests
from PIL import Image

from defectvlm.config import ServeParams
from defectvlm.serve.app import create_app
from tests.serve.conftest import b64, image_bytes, running

LIMITS = {"max_image_pixels": 200_000, "max_body_bytes": 300_000, "max_boxes": 4, "max_wait_ms": 1.0}


@pytest.fixture(scope="module")
def url(scorer):
    with running(create_app(ServeParams(**LIMITS), lambda: scorer)) as base:
        yield base


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height over one tiny compressed row: a decompression bomb's shape."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def post_json(url: str, body, **kwargs) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return requests.post(f"{url}/v1/inspect", data=data, headers=headers, timeout=60, **kwargs)


def good_request(url: str) -> None:
    response = post_json(url, {"image": b64(image_bytes()), "boxes": [{"xyxy": [4, 4, 40, 30]}]})
    assert response.status_code == 200, response.text
    assert [r["xyxy"] for r in response.json()["regions"]] == [[4, 4, 40, 30]]


JPEG = image_bytes(fmt="JPEG")
BAD_INPUTS = {
    "not an image": (lambda: post_json, {"image": b64(b"just some text, not pixels")}, 400, "not an image"),
    "truncated image": (lambda: post_json, {"image": b64(JPEG[: len(JPEG) // 2])}, 400, "truncated"),
    "decompression bomb": (lambda: post_json, {"image": b64(png_header_only(30000, 30000))}, 413, "900000000 pixels"),
    "over max_image_pixels": (
        lambda: post_json,
        {"image": b64(image_bytes((600, 400)))},
        413,
        "over serve.max_image_pixels (200000)",
    ),
    "not base64": (lambda: post_json, {"image": "%%% not base64 %%%"}, 400, "not valid base64"),
    "malformed JSON": (lambda: post_json, b'{"image": "abc", ', 400, "malformed JSON at line 1"),
    "too many boxes": (
        lambda: post_json,
        {"image": b64(image_bytes()), "boxes": [{"xyxy": [0, 0, 9, 9]}] * 5},
        422,
        "at most 4",
    ),
    "box outside the image": (
        lambda: post_json,
        {"image": b64(image_bytes()), "boxes": [{"xyxy": [50, 10, 97, 30]}]},
        422,
        "boxes[0]: [50.0, 10.0, 97.0, 30.0] is outside the 96x64 image",
    ),
    "box upside down": (
        lambda: post_json,
        {"image": b64(image_bytes()), "boxes": [{"xyxy": [50, 30, 10, 40]}]},
        422,
        "x2 > x1",
    ),
    "box of three numbers": (
        lambda: post_json,
        {"image": b64(image_bytes()), "boxes": [{"xyxy": [1, 2, 3]}]},
        422,
        "boxes.0.xyxy",
    ),
    "unknown field": (lambda: post_json, {"image": b64(image_bytes()), "colour": "red"}, 422, "colour: Extra inputs"),
    "unknown box field": (
        lambda: post_json,
        {"image": b64(image_bytes()), "boxes": [{"xyxy": [1, 2, 9, 9], "cls": 3}]},
        422,
        "boxes.0.cls: Extra inputs",
    ),
    "missing image": (lambda: post_json, {"boxes": []}, 422, "image: Field required"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_json_input_is_a_4xx_with_its_message_and_the_service_keeps_serving(url, case):
    send, body, status, message = BAD_INPUTS[case]
    response = send()(url, body)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    good_request(url)


def multipart(url: str, files: dict, data: dict | None = None) -> requests.Response:
    return requests.post(f"{url}/v1/inspect", files=files, data=data or {}, timeout=60)


@pytest.mark.parametrize(
    ("files", "data", "status", "message"),
    [
        ({"image": ("a.png", b"\x00\x01 not an image")}, None, 400, "not an image"),
        ({"image": ("a.png", image_bytes())}, {"boxes": "[{xyxy: }"}, 400, "boxes: malformed JSON"),
        ({"image": ("a.png", image_bytes())}, {"boxes": '{"xyxy": [1, 2, 3, 4]}'}, 422, "expected a JSON list"),
        ({"image": ("a.png", image_bytes())}, {"boxes": '[{"xyxy": [0, 0, 200, 9]}]'}, 422, "outside the 96x64"),
        ({"image": ("a.png", image_bytes())}, {"comment": "hi"}, 422, "comment: unknown field"),
        ({"picture": ("a.png", image_bytes())}, None, 422, "picture: unknown field"),
        ({"boxes": (None, "[]")}, None, 422, "image: a file field named image is required"),
        ({"image": ("a.png", b"\x89PNG" + b"\0" * 400_000)}, None, 413, "serve.max_body_bytes (300000 bytes)"),
    ],
)
def test_bad_multipart_input_is_a_4xx_with_its_message(url, files, data, status, message):
    response = multipart(url, files, data)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    good_request(url)


def test_a_streamed_body_over_the_limit_is_refused_while_it_is_read(url):
    chunks = (b"x" * 50_000 for _ in range(10))  # no Content-Length: chunked transfer
    response = requests.post(f"{url}/v1/inspect", data=chunks, headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 413
    assert "max_body_bytes" in response.json()["detail"]
    good_request(url)


def test_other_content_types_are_refused(url):
    response = requests.post(f"{url}/v1/inspect", data=b"abc", headers={"Content-Type": "text/plain"}, timeout=60)
    assert response.status_code == 415
    assert "application/json or multipart" in response.json()["detail"]


def test_json_and_multipart_forms_give_the_same_answer_naming_the_model(url):
    picture = image_bytes((90, 60), seed=3)
    boxes = [{"xyxy": [2, 3, 40, 30]}, {"xyxy": [45, 10, 88, 58]}]
    by_json = post_json(url, {"image": b64(picture), "boxes": boxes}).json()
    by_form = multipart(url, {"image": ("x.png", picture)}, {"boxes": json.dumps(boxes)}).json()
    assert by_json == by_form
    assert set(by_json) == {"image", "verdict", "score", "threshold", "model", "width", "height", "regions"}
    assert by_json["image"] is None  # an upload has no path
    assert by_json["model"] == {"uri": "base", "version": None}  # the untrained base: no registered version
    assert (by_json["width"], by_json["height"]) == (90, 60)
    assert [r["id"] for r in by_json["regions"]] == [1, 2]
    for region in by_json["regions"]:
        assert set(region) == {"id", "xyxy", "p_abnormal", "cls", "class_probs", "proposal"}
        assert region["proposal"] == {"score": None, "cls": None, "from": "request"}
        assert 0 <= region["p_abnormal"] <= 1
        if region["p_abnormal"] >= by_json["threshold"]:
            assert sorted(region["class_probs"]) == ["incomplete_spreading", "over_melt", "slag", "streak"]
            assert abs(sum(region["class_probs"].values()) - 1) < 1e-4
            assert region["cls"] == max(region["class_probs"], key=region["class_probs"].get)
        else:
            assert region["cls"] is None and region["class_probs"] is None
    assert by_json["score"] == max(r["p_abnormal"] for r in by_json["regions"])
    assert by_json["verdict"] == ("abnormal" if by_json["score"] >= by_json["threshold"] else "normal")


def test_without_boxes_the_default_grid_of_predict_is_judged(url):
    """The base has no training defects to size windows on: prompt_config's quarter-image windows."""
    answer = post_json(url, {"image": b64(image_bytes((80, 60)))}).json()
    assert [r["xyxy"] for r in answer["regions"]] == [
        [x, y, x + 20, y + 15] for y in (0, 15, 30, 45) for x in (0, 20, 40, 60)
    ]
    assert {r["proposal"]["from"] for r in answer["regions"]} == {"grid"}


def test_exif_rotated_images_take_boxes_in_the_upright_frame(url):
    stored = Image.new("RGB", (96, 64), (80, 80, 80))
    exif = stored.getexif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees: 64 wide, 96 high
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", exif=exif)
    inside_upright = post_json(url, {"image": b64(buffer.getvalue()), "boxes": [{"xyxy": [0, 0, 60, 90]}]})
    assert inside_upright.status_code == 200, inside_upright.text
    assert (inside_upright.json()["width"], inside_upright.json()["height"]) == (64, 96)
    outside_upright = post_json(url, {"image": b64(buffer.getvalue()), "boxes": [{"xyxy": [0, 0, 90, 60]}]})
    assert outside_upright.status_code == 422


def test_health_readiness_metrics_and_openapi(url):
    assert requests.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
    assert requests.get(f"{url}/readyz", timeout=10).json() == {"status": "ready", "version": "base"}
    good_request(url)
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    assert 'defectvlm_requests_total{route="/v1/inspect",status="200"}' in metrics
    assert "defectvlm_request_seconds_bucket" in metrics
    assert 'defectvlm_model_info{version="base"} 1.0' in metrics
    assert "defectvlm_queue_depth" in metrics and "defectvlm_batch_size_count" in metrics
    schema = requests.get(f"{url}/openapi.json", timeout=10).json()
    body = schema["paths"]["/v1/inspect"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert "/v1/chat/completions" in schema["paths"]
    assert requests.get(f"{url}/docs", timeout=10).status_code == 200
