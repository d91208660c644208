"""Reading video files for `specvlm generate --video` (PyAV): evenly spaced RGB frames of a tiny generated clip, and
one-line errors naming the fix for a missing file, a file that is no video, a missing video library, and a model
whose processor takes no video."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from specvlm_hf.errors import UserError
from specvlm_hf.video import evenly_spaced, read_video

av = pytest.importorskip("av", reason="PyAV (the `video` extra) is not installed")


def write_clip(path, frames: int = 12, size: int = 32, fps: int = 6) -> None:
    """An MPEG-4 clip of a white square moving right by 2 pixels a frame on black."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(frames):
            image = np.zeros((size, size, 3), dtype=np.uint8)
            image[12:20, 2 * index : 2 * index + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_read_video_keeps_evenly_spaced_rgb_frames(tmp_path):
    write_clip(tmp_path / "clip.mp4")
    clip = read_video(tmp_path / "clip.mp4", num_frames=4)
    assert clip.frames.shape == (4, 32, 32, 3) and clip.frames.dtype == np.uint8
    columns = [int(np.argmax(frame[16, :, 0] > 128)) for frame in clip.frames]  # the square's left edge
    assert columns == sorted(columns) and columns[-1] - columns[0] >= 16  # frames 0 and 11: 22 px apart
    assert clip.frame_interval == pytest.approx(11 / 3 / 6, rel=0.05)
    assert evenly_spaced(12, 4) == [0, 4, 7, 11] and evenly_spaced(3, 8) == [0, 1, 2]


def test_unreadable_video_files_are_refused_naming_the_fix(tmp_path):
    with pytest.raises(UserError, match="does not exist; pass an existing file with --video"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(UserError, match="cannot be decoded as a video"):
        read_video(tmp_path / "notes.mp4")


def test_a_missing_video_library_names_the_extra_to_install(tmp_path, monkeypatch):
    write_clip(tmp_path / "clip.mp4", frames=2)
    monkeypatch.setitem(sys.modules, "av", None)
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(UserError, match=r"pip install 'specvlm-hf\[video\]'"):
        read_video(tmp_path / "clip.mp4")


def test_generate_refuses_a_video_for_a_model_without_video(capsys, tmp_path):
    from specvlm_hf.cli import main

    write_clip(tmp_path / "clip.mp4", frames=4)
    status = main(["generate", "--video", str(tmp_path / "clip.mp4"), "--draft", "none", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert status == 2 and "takes no video" in err and "Qwen2-VL" in err
    assert main(["generate", "--video", str(tmp_path / "clip.mp4"), "--no-image"]) == 2
    assert "--video replaces the image" in capsys.readouterr().err


def test_demo_reads_an_uploaded_video_for_a_video_model_only(tmp_path):
    from types import SimpleNamespace

    from specvlm_hf import demo_app

    write_clip(tmp_path / "clip.mp4", frames=10)
    takes_video, image_only = SimpleNamespace(video_processor=object()), SimpleNamespace()
    assert demo_app.check_video(tmp_path / "clip.mp4", takes_video).frames.shape == (8, 32, 32, 3)
    with pytest.raises(demo_app.InputError, match="This model takes no video; upload an image instead."):
        demo_app.check_video(tmp_path / "clip.mp4", image_only)
    from specvlm_hf.hf_internals import NoVideoProcessor

    # without torchvision: a Qwen-VL processor takes clips (`qwen_video_inputs`), others do not
    qwen_like = SimpleNamespace(merge_size=2, temporal_patch_size=2, patch_size=14)
    no_torchvision = SimpleNamespace(video_processor=NoVideoProcessor(), image_processor=qwen_like)
    assert demo_app.check_video(tmp_path / "clip.mp4", no_torchvision).frames.shape[0] == 8
    no_torchvision.image_processor = SimpleNamespace()
    with pytest.raises(demo_app.InputError, match="This model takes no video"):
        demo_app.check_video(tmp_path / "clip.mp4", no_torchvision)
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(demo_app.InputError, match="^The video cannot be decoded as a video") as error:
        demo_app.check_video(tmp_path / "notes.mp4", takes_video)
    assert str(tmp_path) not in str(error.value)  # no server path in the page's message
