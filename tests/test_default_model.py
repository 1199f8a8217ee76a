"""The bundled default model: loads offline from the package and segments real CXRs well."""

import socket

import cv2
import numpy as np
import pandas as pd

from lungmask_kit.cli.app import main
from lungmask_kit.metrics import dice
from lungmask_kit.models.modeling import DEFAULT_WEIGHTS, load_config

from conftest import shared


def test_default_model_ships_as_fp16_safetensors_with_config():
    cfg, path = load_config(None)
    assert path == DEFAULT_WEIGHTS and path.stat().st_size < 25 * 2**20
    assert (cfg.arch, cfg.encoder, cfg.in_channels, cfg.input_size) == ("FPN", "densenet121", 1, 256)
    assert 0 < cfg.mean[0] < 1 and 0 < cfg.std[0] < 1 and len(cfg.provenance["sha256"]) == 64
    assert (DEFAULT_WEIGHTS.parent / "MODEL_CARD.md").is_file()


def _segment_and_score(images, masks, out, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)  # offline: nothing may be fetched
    assert main(["segment", str(images), "-o", str(out), "-q"]) == 0
    m = pd.read_parquet(out / "manifest.parquet")
    scores = []
    for row in m.itertuples():
        pred = cv2.imread(str(out / row.mask_path), cv2.IMREAD_UNCHANGED)
        truth = cv2.imread(str(masks / row.path), cv2.IMREAD_UNCHANGED)
        assert pred.shape == truth.shape and set(np.unique(pred)) <= {0, 255}
        scores.append(dice(pred > 0, truth > 0))
    return m, np.array(scores)


def test_bundled_example_with_default_model(tmp_path, example_images, example_masks, monkeypatch):
    m, scores = _segment_and_score(example_images, example_masks, tmp_path / "out", monkeypatch)
    assert len(m) == 8 and (m.status == "ok").all() and m.qc_pass.all()
    assert (m.n_components >= 1).all()
    # these patients were in the training data: a sanity bar, not an evaluation (see MODEL_CARD.md)
    assert scores.mean() > 0.93 and scores.min() > 0.85


def test_shared_cxr_sample_with_default_model(tmp_path, monkeypatch):
    data = shared("cxr-sample")
    m, scores = _segment_and_score(data / "images", data / "masks", tmp_path / "out", monkeypatch)
    assert len(m) == len(list((data / "images").iterdir())) and (m.status == "ok").all()
    assert scores.mean() > 0.93
