"""LIO configuration: the only package that imports rtslib_fb."""
