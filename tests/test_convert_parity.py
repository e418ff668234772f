"""The parity check's environment (avmae.convert.parity.source_code): the source repositories' model
code runs on current timm, NumPy and torch inside the block, and everything changed for it, or by
it, is put back on leaving. The checkout here is a stand-in written by the test, doing what the
released code does at import and construction time (np.float, torch._six, qk_scale, CAV-MAE's
replacement of timm's classes)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import timm.models.vision_transformer as vt

from avmae.convert import CheckSkipped, source_code

MODELS_MAE = """
import numpy as np
import timm.models.vision_transformer as vt
from torch._six import inf

import helper_util

FLOAT = np.float


class PatchEmbed(vt.PatchEmbed):
    pass


def build():
    vt.PatchEmbed = PatchEmbed  # CAV-MAE's constructors do this to timm, module-wide
    return vt.Block(dim=8, num_heads=2, qkv_bias=True, qk_scale=None)
"""


@pytest.fixture
def checkout(tmp_path):
    (tmp_path / "models_mae.py").write_text(MODELS_MAE)
    (tmp_path / "models_vit.py").write_text("VALUE = 1\n")
    (tmp_path / "helper_util.py").write_text("HELPER = True\n")
    return tmp_path


def _state():
    return {
        "path": list(sys.path),
        "np.float": hasattr(np, "float"),
        "torch._six": "torch._six" in sys.modules,
        "PatchEmbed": vt.PatchEmbed,
        "Block.__init__": vt.Block.__init__,
        "Attention.__init__": vt.Attention.__init__,
        "source modules": sorted({"models_mae", "models_vit", "helper_util"} & set(sys.modules)),
    }


def test_source_code_runs_inside_and_leaves_nothing_behind(checkout):
    before = _state()
    assert before["np.float"] is False and before["source modules"] == []
    with source_code("mae", checkout) as (models_mae, models_vit):
        assert models_mae.FLOAT is float and models_mae.inf == float("inf") and models_vit.VALUE == 1
        block = models_mae.build()  # qk_scale=None accepted
        assert isinstance(block, vt.Block) and vt.PatchEmbed is models_mae.PatchEmbed
        assert sys.path[0] == str(checkout)
    assert _state() == before
    with pytest.raises(TypeError, match="qk_scale"):  # timm's own Block again
        vt.Block(dim=8, num_heads=2, qk_scale=None)


def test_source_code_that_does_not_import_is_skipped_and_leaves_nothing_behind(checkout):
    (checkout / "models_vit.py").write_text("raise ImportError('needs timm 0.3.2')\n")
    before = _state()
    with pytest.raises(CheckSkipped, match="needs timm 0.3.2"):
        with source_code("mae", checkout):
            pass
    assert _state() == before
    with pytest.raises(CheckSkipped, match="not found"):
        with source_code("mae", checkout / "absent"):
            pass
