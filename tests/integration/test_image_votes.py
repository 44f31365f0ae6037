"""A matrix assessor and an image assessor in one ensemble, through the real worker, PostgreSQL and Mosquitto.

Coils that arrive with surface images get both votes; coils without get the matrix vote only, the image
model's abstention is stored as an ``ABSTAIN`` row, and the decision averages over the models that voted.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from assess_env import assess_env, wait_for
from sqlalchemy import select
from unit.helpers import synthetic_images

from ml.assessors.registry import create
from ml.images import encode_png
from ml.sim import LineConfig, LineSimulator
from services.db.models import Assessment, Model
from workflows.messages import encode_coil_message

pytestmark = pytest.mark.integration


def test_coils_with_and_without_images_are_decided_and_abstentions_recorded(
    pg_database_factory: Callable[[], str], mqtt_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    cnn = create("cnn", {"epochs": 1, "width": 4, "seed": 1})
    cnn.fit(LineSimulator(LineConfig(seed=31, id_prefix="TR")).dataset(300), device="cpu")
    images = synthetic_images(per_class=6, seed=2)
    rmcsam = create("rmcsam", {"epochs": 1, "imgsz": 32, "batch_size": 16, "seed": 3})
    rmcsam.fit(images, device="cpu")

    coils = list(itertools.islice(LineSimulator(LineConfig(seed=32, id_prefix="IMG")).stream(), 40))
    with_images = {c.coil_id for c in coils[::2]}
    surface = [{"kind": "surface", "format": "png", "data_b64": _b64(encode_png(img))} for img in images.images[:2]]
    with assess_env(pg_database_factory(), mqtt_url, f"{topic_prefix}/image-votes", tmp_path) as env:
        env.register(cnn)
        env.register(rmcsam)
        with env.worker():
            for c in coils:
                payload = encode_coil_message(
                    c.coil_id,
                    c.line,
                    c.produced_at,
                    c.thickness,
                    images=surface if c.coil_id in with_images else None,
                    binary=True,
                )
                env.publisher.publish(env.topics.sensors(c.line), payload, qos=1)
            assert wait_for(lambda: len(env.listener.decisions) == len(coils), timeout=90)
        with env.engine.connect() as conn:
            rows = conn.execute(
                select(Assessment.coil_id, Model.name, Assessment.label, Assessment.p_nok).join(Model)
            ).all()
    assert env.listener.rejected == []
    votes = {(r.coil_id, r.name): r for r in rows}
    for c in coils:
        image_vote = votes[(c.coil_id, "rmcsam")]
        assert votes[(c.coil_id, "cnn")].label in ("OK", "NOK")
        if c.coil_id in with_images:
            assert image_vote.label in ("OK", "NOK") and image_vote.p_nok is not None
        else:
            assert image_vote.label == "ABSTAIN" and image_vote.p_nok is None
    decided = {d["coil_id"]: d for d in env.listener.decisions}
    for coil_id, decision in decided.items():
        voted = [v for v in decision["votes"] if v["label"] != "ABSTAIN"]
        assert len(voted) == (2 if coil_id in with_images else 1)


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()
