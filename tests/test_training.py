import json
import math

import numpy as np
import pytest
import torch

from lungmask_kit.models import ModelConfig, build_model, load_model, save_model
from lungmask_kit.training.augment import apply_pair, train_transform
from lungmask_kit.training.data import Pair, split_pairs
from lungmask_kit.training.losses import ComboLoss
from lungmask_kit.training.trainer import TrainSettings, train

from conftest import cxr_like, write_png


def test_combo_loss_matches_hand_computation():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    p = [1 / (1 + math.exp(-v)) for v in (2.0, -1.0, 0.5, -3.0)]
    t = [1, 0, 0, 1]
    dice = 1 - 2 * sum(pi * ti for pi, ti in zip(p, t)) / (sum(p) + sum(t))
    bce = -sum(ti * math.log(pi) + (1 - ti) * math.log(1 - pi) for pi, ti in zip(p, t)) / 4
    pt = [pi if ti else 1 - pi for pi, ti in zip(p, t)]
    focal = sum(-((1 - q) ** 2) * math.log(q) for q in pt) / 4  # per pixel, then mean
    assert ComboLoss()(logits, target).item() == pytest.approx(dice + bce + focal, rel=1e-5)
    # the published code's focal on the mean BCE gives a different number: we are per pixel
    focal_on_mean = (1 - math.exp(-bce)) ** 2 * bce
    assert focal != pytest.approx(focal_on_mean, rel=1e-3)


def test_augmentation_keeps_image_and_mask_aligned():
    torch.manual_seed(0)
    mask = torch.zeros(1, 128, 128, dtype=torch.uint8)
    mask[:, 20:100, 15:55] = 1
    mask[:, 30:110, 75:115] = 1
    image = mask.float()  # the image shows exactly the mask, so alignment is checkable
    tf = train_transform([0.0], [1.0])
    for _ in range(20):
        img_t, mask_t = apply_pair(tf, image, mask)
        assert mask_t.dtype == torch.uint8 and set(mask_t.unique().tolist()) <= {0, 1}
        agree = ((img_t > 0.5) == (mask_t > 0)).float().mean().item()
        assert agree > 0.97


def test_patient_split_never_shares_a_patient():
    pairs = [Pair(f"i{i}.png", f"m{i}.png", f"p{i % 7}") for i in range(40)]
    train_p, val_p, by_patient = split_pairs(pairs, 0.25, seed=3)
    assert by_patient and len(train_p) + len(val_p) == 40
    assert not {p.patient_id for p in train_p} & {p.patient_id for p in val_p}
    assert 6 <= len(val_p) <= 16


def test_checkpoint_roundtrip_fp32_and_fp16(tmp_path):
    cfg = ModelConfig(arch="FPN", encoder="resnet18", mean=[0.4], std=[0.2], input_size=64)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        ref = model(x)
    save_model(model, cfg, tmp_path / "m.safetensors")
    loaded, cfg2, sha = load_model(tmp_path / "m.safetensors")
    assert cfg2.mean == [0.4] and cfg2.encoder == "resnet18" and len(sha) == 64
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    save_model(model, cfg, tmp_path / "half" / "model.safetensors", dtype=torch.float16)
    half, _, _ = load_model(tmp_path / "half")
    with torch.no_grad():
        assert torch.allclose(half(x), ref, atol=0.05)
    assert json.loads((tmp_path / "half" / "config.json").read_text())["format"] == "lungkit-model/1"


def _synthetic_pairs(root, n=12):
    for i in range(n):
        img = cxr_like(96, 96, seed=i)
        mask = (img < 110).astype(np.uint8) * 255  # lungs are the dark fields
        write_png(root / "images" / f"p{i}.png", img)
        write_png(root / "masks" / f"p{i}.png", mask)
    return root


def test_few_training_steps_reduce_loss(tmp_path):
    from lungmask_kit.training.data import PairDataset, find_pairs
    from lungmask_kit.training.augment import eval_transform

    pairs = find_pairs(_synthetic_pairs(tmp_path / "data"))
    ds = PairDataset(pairs[:4], 64, 1, eval_transform([0.5], [0.25]))
    x = torch.stack([ds[i][0] for i in range(4)])
    y = torch.stack([ds[i][1] for i in range(4)])
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="resnet18", input_size=64)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = ComboLoss()
    losses = []
    for _ in range(8):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_train_writes_checkpoint_log_and_resumes(tmp_path):
    data = _synthetic_pairs(tmp_path / "data")
    settings = TrainSettings(data=str(data), out=str(tmp_path / "run"), encoder="resnet18", input_size=64,
                             epochs=2, batch_size=4, val_fraction=0.25)
    s = train(settings, torch.device("cpu"), progress=False, log=lambda _: None)
    run = tmp_path / "run"
    assert (run / "best.safetensors").is_file() and (run / "log.csv").is_file()
    cfg = json.loads((run / "best.json").read_text())
    assert cfg["provenance"]["n_train"] == 9 and 0 < cfg["mean"][0] < 1
    assert s["best_val_dice"] > 0
    settings.epochs = 3
    train(settings, torch.device("cpu"), resume=True, progress=False, log=lambda _: None)
    assert [r["epoch"] for r in json.loads((run / "log.json").read_text())] == [1, 2, 3]


def test_imagenet_weights_offline_fail_clearly(monkeypatch):
    from lungmask_kit.errors import LungkitError

    def offline(*a, **k):
        raise OSError("Temporary failure in name resolution")

    import segmentation_models_pytorch as smp

    monkeypatch.setattr(smp, "create_model", offline)
    with pytest.raises(LungkitError, match="need the network"):
        build_model(ModelConfig(), encoder_weights="imagenet")


def test_a_folders_pairs_csv_gives_the_patients_the_split_keeps_together(tmp_path):
    """The shared data's layout (images/, masks/, pairs.csv with patient_id): split by patient, not by image."""
    import csv as csv_module

    import numpy as np

    from conftest import cxr_like, write_png
    from lungmask_kit.training.data import find_pairs, split_pairs

    with open(tmp_path / "pairs.csv", "w", newline="") as fh:
        w = csv_module.writer(fh)
        w.writerow(["name", "view", "patient_id"])
        for i in range(12):
            img = cxr_like(64, 64, seed=i)
            write_png(tmp_path / "images" / f"im{i}.png", img)
            write_png(tmp_path / "masks" / f"im{i}.png", (img < 110).astype(np.uint8) * 255)
            w.writerow([f"im{i}", "PA", f"p{i // 3}"])  # 4 patients of 3 images
    pairs = find_pairs(tmp_path)
    assert {p.image.stem: p.patient_id for p in pairs} == {f"im{i}": f"p{i // 3}" for i in range(12)}
    train, val, by_patient = split_pairs(pairs, 0.25, 0)
    assert by_patient and {p.patient_id for p in train}.isdisjoint({p.patient_id for p in val})
