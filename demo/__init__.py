"""Face detection on a video stream, parallelised with pytaskqml (``python -m demo --help``)."""

import os

# Before anything imports cv2: keep OpenCV's and FFmpeg's own log lines off stderr, so an
# unreadable --input gives exactly one line there (ours).
os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
