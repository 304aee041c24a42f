"""The invite code as a QR code, drawn as SVG (the only module that imports segno)."""

from __future__ import annotations

import io

import segno


def qr_svg(text: str) -> str:
    """``text`` as an inline ``<svg>`` QR code (for a phone's camera)."""
    code = segno.make(text, error="m")
    out = io.BytesIO()
    code.save(out, kind="svg", scale=3, border=2, xmldecl=False, svgns=True, svgclass="qr")
    return out.getvalue().decode()
