"""The inspection service's section (`defectvlm serve`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from defectvlm.config.base import AtLeastOne, Float, NonNegative, Section, rule

Port = rule(lambda v: 0 < v < 65536, "within 1..65535")


class ServeParams(Section):
    """The HTTP service (`defectvlm serve`): limits, dynamic batching, auth and alias following."""

    host: str = Field(
        "127.0.0.1", description="Address to bind; 127.0.0.1 keeps the service off the network unless told."
    )
    port: Annotated[int, Port] = Field(8000, description="TCP port.")
    max_batch_size: Annotated[int, AtLeastOne] = Field(
        8, description="Most images scored in one forward pass (1 turns batching off)."
    )
    max_wait_ms: Annotated[Float, NonNegative] = Field(
        10.0, description="How long the first request of a batch waits for others to join it."
    )
    queue_size: Annotated[int, AtLeastOne] = Field(
        64, description="Requests waiting at most; more are refused with 503 and Retry-After."
    )
    request_timeout_s: Annotated[Float, NonNegative] = Field(
        30.0, description="A request not answered within this many seconds gets 504."
    )
    max_body_bytes: Annotated[int, AtLeastOne] = Field(
        20_000_000, description="Largest request body; larger uploads get 413 before they are read."
    )
    max_image_pixels: Annotated[int, AtLeastOne] = Field(
        40_000_000, description="Largest image (width x height, from the header); larger get 413."
    )
    max_boxes: Annotated[int, AtLeastOne] = Field(32, description="Most boxes in one request.")
    max_new_tokens: Annotated[int, AtLeastOne] = Field(
        256, description="Largest answer of /v1/chat/completions (a request may ask for fewer)."
    )
    token_env: str = Field(
        "DEFECTVLM_SERVE_TOKEN", description="Environment variable with the bearer token; unset: no auth."
    )
    follow_interval_s: Annotated[Float, NonNegative] = Field(
        30.0, description="How often a models:/name@alias model asks the registry if it moved."
    )
