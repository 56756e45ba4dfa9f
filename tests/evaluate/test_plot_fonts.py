"""Chinese class names in the evaluation's plots."""

from __future__ import annotations

import warnings

import pytest
from matplotlib import font_manager

from defectvlm.evaluate import plot_fonts
from defectvlm.evaluate.report import write_plots

CHINESE_CLASSES = ["完整", "夹渣", "过熔"]


def test_chinese_class_names_in_the_confusion_matrix_are_drawn_with_their_glyphs(tmp_path):
    if plot_fonts.cjk_font_family() is None:
        pytest.skip(f"no CJK font installed (Debian/Ubuntu: apt-get install {plot_fonts.CJK_FONT_PACKAGE})")
    rows = [{"truth": "abnormal", "score": 0.9}, {"truth": "normal", "score": 0.2}]
    confusion = {"matrix": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "labels": CHINESE_CLASSES}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plots = write_plots(rows, {"threshold": 0.5, "defect_type": {"confusion_matrix": confusion}}, tmp_path)
    assert plots["confusion_matrix"] == "plots/confusion_matrix.png"
    assert [str(w.message) for w in caught if "missing from font" in str(w.message)] == []


def test_without_a_cjk_font_the_plots_warn_once_naming_the_package_to_install(monkeypatch):
    monkeypatch.setattr(font_manager, "findSystemFonts", lambda: [])
    plot_fonts.cjk_font_family.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="apt-get install fonts-noto-cjk"):
            assert plot_fonts.cjk_font_rc() == {}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert plot_fonts.cjk_font_rc() == {}  # no second warning
    finally:
        plot_fonts.cjk_font_family.cache_clear()
