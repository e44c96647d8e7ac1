"""The two prefect-docker steps prefect.yaml uses, recorded instead of run (no Docker engine)."""

from __future__ import annotations

import json
import os
from typing import Any


def _record(step: str, **kwargs: Any) -> None:
    with open(os.environ["FAKE_PREFECT_DOCKER_LOG"], "a") as log:
        log.write(json.dumps({"step": step, "cwd": os.getcwd(), **kwargs}) + "\n")


def build_docker_image(image_name: str, dockerfile: str = "Dockerfile", tag: str | None = None,
                       additional_tags: list[str] | None = None, **build_kwargs: Any) -> dict[str, Any]:
    if not image_name or not tag:
        raise ValueError(f"image_name and tag are required, got {image_name!r}, {tag!r}")
    _record("build", image_name=image_name, dockerfile=dockerfile, tag=tag, **build_kwargs)
    return {"image_name": image_name, "tag": tag, "image": f"{image_name}:{tag}",
            "additional_tags": additional_tags or []}


def push_docker_image(image_name: str, tag: str | None = None, **kwargs: Any) -> dict[str, Any]:
    _record("push", image_name=image_name, tag=tag)
    return {"image_name": image_name, "tag": tag, "image": f"{image_name}:{tag}", "additional_tags": []}
