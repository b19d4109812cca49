"""JPEG-LS decoded by imagecodecs, whose CharLS call releases Python's GIL, as a pydicom plugin.

pydicom's own JPEG-LS plugins (pyjpegls, pylibjpeg's libjpeg) hold the GIL while they decode, so two
threads decode no faster than one. imagecodecs (Christoph Gohlke's codec library) runs CharLS inside
`with nogil`: decoder threads then share the cores with each other and with the model's threads,
without the copies and the ~90 MB per process that decoder processes cost (`decoding.DecodePool`).

The plugin only replaces the codec call: pydicom's decoder still checks the frame, applies the pixel
representation and the bits stored, exactly as for pyjpegls (JPEG-LS is exactly specified, so both
give the same values; tests/test_decode_memory.py compares them). This module follows pydicom's plugin
contract (`is_available`, `DECODER_DEPENDENCIES`, a `(src, runner) -> bytes` function) and is
registered once by `register`.
"""

from __future__ import annotations

import importlib.util
import threading

import pydicom.uid
from pydicom.pixels.decoders.base import DecodeRunner

PLUGIN = "imagecodecs"

DECODER_DEPENDENCIES = {
    pydicom.uid.JPEGLSLossless: ("numpy", "imagecodecs"),
    pydicom.uid.JPEGLSNearLossless: ("numpy", "imagecodecs"),
}

_registering = threading.Lock()
_registered: bool | None = None  # None: not yet; then whether the plugin is in pydicom's JPEG-LS decoders


def is_available(uid: str) -> bool:
    """pydicom's plugin check: imagecodecs is installed and built with CharLS."""
    if uid not in DECODER_DEPENDENCIES or importlib.util.find_spec("imagecodecs") is None:
        return False
    import imagecodecs

    return bool(getattr(imagecodecs, "JPEGLS", None) and imagecodecs.JPEGLS.available)


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One JPEG-LS frame's pixels, as pydicom's pyjpegls plugin returns them (the same runner options)."""
    import imagecodecs

    pixels = imagecodecs.jpegls_decode(src)
    if pixels.ndim == 3:  # colour: imagecodecs returns samples last, i.e. colour-by-pixel
        runner.set_option("planar_configuration", 0)
    runner.set_option("bits_allocated", 8 * pixels.dtype.itemsize)
    return pixels.tobytes()


def register() -> bool:
    """Add the plugin to pydicom's JPEG-LS decoders (once per process; pydicom's `add_plugin` is not
    thread-safe, hence the lock; afterwards a flag is read, as every decoded slice asks). False where
    imagecodecs is not installed: pyjpegls then decodes."""
    global _registered
    if _registered is None:
        from pydicom.pixels import get_decoder

        with _registering:
            if _registered is None:
                for uid in DECODER_DEPENDENCIES:
                    decoder = get_decoder(uid)
                    if PLUGIN not in decoder.available_plugins and PLUGIN not in getattr(decoder, "_unavailable", {}):
                        decoder.add_plugin(PLUGIN, (__name__, "decode_frame"))
                _registered = PLUGIN in get_decoder(pydicom.uid.JPEGLSLossless).available_plugins
    return _registered
