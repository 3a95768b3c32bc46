"""dflash-local: lossless DFlash block-diffusion speculative decoding for local GGUF models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dflash-local")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
