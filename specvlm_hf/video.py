"""Reading a short video file into frames for a video-capable VLM's processor (`specvlm generate --video`, the demo).

Frames are decoded with PyAV (`pip install 'specvlm-hf[video]'`), or with OpenCV where PyAV is not installed, and
`num_frames` of them are kept, evenly spaced over the clip (Qwen-VL and LLaVA-OneVision processors take the
frames as a `(T, H, W, 3)` uint8 array).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

DEFAULT_FRAMES = 8
INSTALL_HINT = "install PyAV with `pip install 'specvlm-hf[video]'` (or `pip install av`), or OpenCV"


@dataclass
class VideoClip:
    """Frames of a video: `frames` `(T, H, W, 3)` uint8 RGB, and the seconds between kept frames (`frame_interval`,
    None where the file gives no frame rate)."""

    frames: np.ndarray
    frame_interval: float | None = None
    path: str = ""


def evenly_spaced(total: int, count: int) -> list[int]:
    """`count` frame indices spread evenly over `total` frames (all of them when there are fewer)."""
    if total <= count:
        return list(range(total))
    return [round(i * (total - 1) / (count - 1)) if count > 1 else 0 for i in range(count)]


def _decode_av(path: Path):
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError(f"{path} has no video stream; pass a video file (MP4, WebM, AVI, ...) with --video.")
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else None
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except av.FFmpegError as error:
        raise UserError(f"{path} cannot be decoded as a video ({error}); pass a whole MP4 / WebM file.") from None
    return frames, rate


def _decode_cv2(path: Path):
    import cv2

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise UserError(f"{path} cannot be opened as a video; pass a whole MP4 / WebM / AVI file with --video.")
    rate = capture.get(cv2.CAP_PROP_FPS) or None
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames, rate


def read_video(path, num_frames: int = DEFAULT_FRAMES) -> VideoClip:
    """The `num_frames` evenly spaced frames of the video file `path`.

    Raises:
        UserError: the file does not exist, is not a decodable video, has no frames, or no video library is
            installed (naming the package to install).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"Video {path} does not exist; pass an existing file with --video.")
    if path.is_dir():
        raise UserError(f"--video {path} is a folder; pass one video file (MP4, WebM, AVI, ...).")
    try:
        decode = _decode_av
        import av  # noqa: F401
    except ImportError:
        try:
            import cv2  # noqa: F401

            decode = _decode_cv2
        except ImportError:
            raise UserError(f"Reading --video {path} needs a video library: {INSTALL_HINT}.") from None
    frames, rate = decode(path)
    if not frames:
        raise UserError(f"{path} holds no decodable frame; pass a whole video file with --video.")
    chosen = evenly_spaced(len(frames), num_frames)
    interval = None
    if rate and len(chosen) > 1:
        interval = (chosen[-1] - chosen[0]) / (len(chosen) - 1) / rate
    return VideoClip(np.stack([frames[i] for i in chosen]), interval, str(path))
