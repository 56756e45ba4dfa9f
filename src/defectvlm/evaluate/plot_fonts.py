"""A font for the Chinese class names in plots. Matplotlib's default (DejaVu Sans) has no CJK
glyphs and draws them as empty boxes; a CJK font installed on the machine becomes the fallback
for the glyphs DejaVu Sans lacks, so Latin text looks as before."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

CJK_FONT_PACKAGE = "fonts-noto-cjk"
# file names of the common CJK fonts (Debian: fonts-noto-cjk, fonts-wqy-*, fonts-droid-fallback)
CJK_FONT_FILES = ("NotoSansCJK", "NotoSerifCJK", "SourceHanSans", "wqy-zenhei", "wqy-microhei", "DroidSansFallback")


def cjk_font_rc() -> dict:
    """Matplotlib settings (for `matplotlib.rc_context`) that draw CJK text with an installed CJK
    font; none, and a warning naming the package to install, when there is no such font."""
    family = cjk_font_family()
    return {} if family is None else {"font.family": ["sans-serif", family]}


@functools.cache
def cjk_font_family() -> str | None:
    """The family name of the first CJK font installed (sans-serif first), registered with
    matplotlib; None (warned once) when there is none."""
    from matplotlib import font_manager

    # the system's font files, not matplotlib's font cache: that one is stale after a font install
    found = [path for path in font_manager.findSystemFonts() if Path(path).name.startswith(CJK_FONT_FILES)]
    if not found:
        warnings.warn(
            f"no CJK font installed: Chinese class names in plots are drawn as empty boxes; "
            f"install one (Debian/Ubuntu: apt-get install {CJK_FONT_PACKAGE})",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    found.sort(key=lambda path: ([Path(path).name.startswith(name) for name in CJK_FONT_FILES].index(True), path))
    for path in found:
        font_manager.fontManager.addfont(path)
    return font_manager.FontProperties(fname=found[0]).get_name()
