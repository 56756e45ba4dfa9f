"""The generators' bytes do not depend on the processor.

numpy chooses a SIMD kernel for its transcendental functions at run time, and libjpeg-turbo one
for its DCT and colour conversion: a machine without AVX-512 runs other kernels than one with it.
`digests_at` runs the demo generator and a window of the tiny base's pretraining corpus in a
subprocess with every dispatched numpy kernel switched off (NPY_DISABLE_CPU_FEATURES) and
libjpeg-turbo's SIMD off (JSIMD_FORCENONE): the bytes must equal this process's. Before
`defectvlm.exact_math`, the corpus window below and the small demo set differed that way, and the
shipped corpus digest failed on an AVX2-only AMD EPYC. The pinned digests catch a divergence on a
machine whose kernels this one cannot switch to (an AVX-512 FP16 Xeon, say).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from defectvlm import exact_math

# corpus items 970..979 hold item 975, whose pixels moved with numpy's kernels before exact_math
_DIGEST_SCRIPT = """
import hashlib, json, sys, tempfile
from pathlib import Path
from defectvlm.data.demo import generate_demo
from defectvlm.models import generic_corpus

corpus = hashlib.sha256()
with tempfile.TemporaryDirectory() as folder:
    for index in range(970, 980):
        _, data = generic_corpus.build_item(0, index, Path(folder), 84)
        corpus.update(data)
demo = hashlib.sha256()
with tempfile.TemporaryDirectory() as folder:
    generate_demo(Path(folder), n_abnormal=12, n_normal=6)
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        demo.update(path.relative_to(folder).as_posix().encode() + b"\\0" + path.read_bytes())
print(json.dumps({"corpus": corpus.hexdigest(), "demo": demo.hexdigest()}))
"""
PINNED = {
    "corpus": "3e61053c8b982eef35099d32f8e448677754805fd2e829c7504c1017ef964f30",
    "demo": "48a583f4ed08c3f3ddc13b45cb4b8807efd41ee66ad45052757880aed93f7533",
}


def _dispatched_numpy_features() -> list[str]:
    """The SIMD targets numpy dispatches to on this machine, beyond its compiled baseline."""
    from numpy._core._multiarray_umath import __cpu_baseline__, __cpu_dispatch__, __cpu_features__

    return [name for name in __cpu_dispatch__ if __cpu_features__.get(name) and name not in __cpu_baseline__]


def digests_at(env: dict[str, str]) -> dict[str, str]:
    result = subprocess.run(
        [sys.executable, "-c", _DIGEST_SCRIPT], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def default_digests() -> dict[str, str]:
    return digests_at({})


def test_generated_bytes_are_the_pinned_ones(default_digests) -> None:
    assert default_digests == PINNED


def test_generated_bytes_do_not_depend_on_the_simd_kernels(default_digests) -> None:
    features = _dispatched_numpy_features()  # highest last: switch off the top ones, then all
    for off in {tuple(features[-2:]), tuple(features)}:
        lower = digests_at({"NPY_DISABLE_CPU_FEATURES": " ".join(off), "JSIMD_FORCENONE": "1"})
        assert lower == default_digests, f"kernels switched off: numpy {off}, libjpeg-turbo SIMD"


@pytest.mark.parametrize(
    ("ours", "reference"),
    [(exact_math.sin, np.sin), (exact_math.cos, np.cos), (exact_math.exp, np.exp)],
)
def test_one_argument_functions_match_numpy_to_a_few_ulp(ours, reference) -> None:
    x = np.concatenate([np.linspace(-40.0, 40.0, 20001), np.random.default_rng(0).uniform(-5000, 5000, 20000)])
    if reference is np.exp:
        x = np.concatenate([x / 10.0, [-745.5, -800.0, 709.0, 720.0, 0.0]])
    with np.errstate(over="ignore"):
        expected = reference(x)
    got = ours(x)
    finite = np.isfinite(expected)
    assert np.array_equal(np.isfinite(got), finite)
    assert np.allclose(got[finite], expected[finite], rtol=4e-16 * 8, atol=1e-300)
    assert isinstance(ours(0.5), float) and math.isclose(ours(0.5), float(reference(0.5)), rel_tol=1e-15)


def test_atan2_matches_numpy_in_every_quadrant_and_on_the_axes() -> None:
    rng = np.random.default_rng(1)
    y = np.concatenate([rng.standard_normal(20000) * 10, [0.0, 0.0, 1.0, -1.0, 0.0, -0.0, 3.0]])
    x = np.concatenate([rng.standard_normal(20000) * 10, [1.0, -1.0, 0.0, 0.0, 0.0, -1.0, 3.0]])
    assert np.allclose(exact_math.atan2(y, x), np.arctan2(y, x), rtol=1e-15, atol=1e-15)
    assert exact_math.atan2(0.0, 0.0) == 0.0 and exact_math.atan2(-0.0, -1.0) == -math.pi


def test_a_reduction_outside_the_exact_range_is_refused() -> None:
    with pytest.raises(ValueError, match="2\\*\\*19"):
        exact_math.sin(np.array([1e7]))
