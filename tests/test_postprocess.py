import numpy as np
import pytest
from skimage import morphology

from lungmask_kit.derive import binarize_mask, bounding_box, derive_variants
from lungmask_kit.postprocess import (
    PostprocessSettings,
    clean_mask,
    count_components,
    fill_small_holes,
    keep_largest_components,
    lung_area_fraction,
    remove_small_objects,
    resize_mask,
)


def _lungs(shape=(256, 256)):
    m = np.zeros(shape, bool)
    m[40:200, 30:110] = True
    m[40:210, 140:230] = True
    return m


def test_remove_small_objects_matches_skimage():
    rng = np.random.default_rng(1)
    m = rng.random((128, 128)) > 0.7
    ours = remove_small_objects(m, 5)
    ref = morphology.remove_small_objects(m, max_size=4, connectivity=2)
    np.testing.assert_array_equal(ours, ref)


def test_fill_small_holes_fills_inner_holes_only():
    m = _lungs()
    m[100:104, 60:64] = False  # 16 px hole inside the left lung
    m[0:5, 0:5] = False
    filled = fill_small_holes(m, 20)
    assert filled[100:104, 60:64].all()
    big_hole = m.copy()
    big_hole[80:120, 50:90] = False  # 1600 px: kept
    assert not fill_small_holes(big_hole, 20)[100, 70]
    assert not filled[0, 0]  # background touching the border is never filled


def test_keep_largest_keeps_two_lungs():
    m = _lungs()
    m[220:230, 10:20] = True  # 100 px blob
    kept = keep_largest_components(m, 2)
    assert count_components(kept) == 2 and not kept[225, 15]
    assert count_components(keep_largest_components(m, 0)) == 3


def test_clean_mask_pure_and_removes_specks():
    prob = _lungs().astype(np.float32) * 0.9
    prob[5:7, 5:7] = 0.99  # speck
    prob[100:103, 60:63] = 0.1  # tiny hole
    before = prob.copy()
    mask = clean_mask(prob, PostprocessSettings())
    np.testing.assert_array_equal(prob, before)  # input never mutated
    assert mask.dtype == bool and not mask[6, 6] and mask[101, 61]
    assert count_components(mask) == 2


def test_resize_mask_to_native_size_is_binary_and_close():
    m = _lungs()
    big = resize_mask(m, (1024, 900))
    assert big.shape == (1024, 900) and big.dtype == bool
    assert lung_area_fraction(big) == pytest.approx(lung_area_fraction(m), abs=0.01)


def test_derive_is_and_and_and_not():
    rng = np.random.default_rng(0)
    img = rng.integers(1, 65535, (60, 50), dtype=np.uint16)
    mask = rng.random((60, 50)) > 0.5
    out = derive_variants(img, mask)
    assert out["lungs"].dtype == np.uint16
    np.testing.assert_array_equal(out["lungs"], img * mask)
    np.testing.assert_array_equal(out["nolungs"], img * ~mask)
    with pytest.raises(ValueError):
        derive_variants(img, mask[:10])


def test_bounding_box_contains_mask_with_margin():
    m = np.zeros((100, 80), bool)
    m[20:30, 10:50] = True
    assert bounding_box(m) == (20, 30, 10, 50)
    assert bounding_box(m, margin=15) == (5, 45, 0, 65)
    assert bounding_box(np.zeros((5, 5), bool)) is None


@pytest.mark.parametrize("scale", [1, 255])
def test_binarize_binary_masks(scale):
    m = _lungs().astype(np.uint8) * scale
    np.testing.assert_array_equal(binarize_mask(m), _lungs())


def test_binarize_antialiased_and_colormapped():
    lungs = _lungs()
    aa = np.where(lungs, 250, 3).astype(np.uint8)
    aa[lungs ^ np.roll(lungs, 1, axis=1)] = 128  # edge levels
    assert (binarize_mask(aa) == lungs).mean() > 0.99
    # a colormap rendered to luminance: background and lung as two non-zero levels
    cmap = np.where(lungs, 200, 30).astype(np.uint8)
    np.testing.assert_array_equal(binarize_mask(cmap), lungs)
