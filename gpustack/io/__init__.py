"""Slice IO: TIFF folders and multi-page TIFFs in, one TIFF per slice out. NumPy only, no torch."""

from gpustack.io.tiff import SliceInfo, StackSource, open_channel, read_slice, write_slice

__all__ = ["SliceInfo", "StackSource", "open_channel", "read_slice", "write_slice"]
