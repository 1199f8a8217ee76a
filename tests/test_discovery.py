import os

from lungmask_kit.discovery import find_images, output_names

from conftest import cxr_like, write_png


def test_finds_images_recursively_any_case_in_stable_order(tmp_path):
    for rel in ["b/z.PNG", "a/x.png", "a/y.JPG", "a/deep/w.tiff", "c.bmp", "d.jpeg", "e.TIF"]:
        write_png(tmp_path / (rel.rsplit(".", 1)[0] + ".png"), cxr_like(8, 8))
        os.replace(tmp_path / (rel.rsplit(".", 1)[0] + ".png"), tmp_path / rel)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"")
    found = find_images(tmp_path)
    assert found == sorted(["a/deep/w.tiff", "a/x.png", "a/y.JPG", "b/z.PNG", "c.bmp", "d.jpeg", "e.TIF"])
    assert find_images(tmp_path) == found  # stable


def test_glob_narrows_by_relative_path_or_name(tmp_path):
    for rel in ["train/a.png", "test/b.png", "train/c.jpg"]:
        write_png(tmp_path / rel, cxr_like(8, 8))
    assert find_images(tmp_path, "train/*") == ["train/a.png", "train/c.jpg"]
    assert find_images(tmp_path, "*.jpg") == ["train/c.jpg"]


def test_symlink_loop_terminates(tmp_path):
    write_png(tmp_path / "a" / "x.png", cxr_like(8, 8))
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")
    assert find_images(tmp_path) == ["a/x.png"]


def test_output_names_mirror_folders_and_never_collide():
    names = output_names(["a/x.png", "b/x.png", "c/y.png", "c/y.jpg", "d/z.jpeg"])
    assert names["a/x.png"] == "a/x.png" and names["b/x.png"] == "b/x.png"
    assert names["c/y.png"] != names["c/y.jpg"]
    assert names["d/z.jpeg"] == "d/z.png"
    assert len(set(names.values())) == len(names)
