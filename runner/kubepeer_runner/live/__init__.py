"""live-video-to-video: trickle in, a frame model, trickle out (see stream.py)."""
