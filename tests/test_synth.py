"""SynthFaces' failure cases: each names what is wrong (the properties are tested in notebook 01 and appendix A1)."""
import pytest
from sce_mae.synth import SynthFaces, render


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="split must be one of"): SynthFaces(3, split='val')
    with pytest.raises(ValueError, match="multiple of 24"): SynthFaces(3, size=100, full=True)
    with pytest.raises(ValueError, match=r"unknown knob\(s\) yawn"): SynthFaces(3, fixed={'yawn': 1})
    with pytest.raises(ValueError, match="n must be"): SynthFaces(-1)
    with pytest.raises(IndexError, match="index 3 out of range for 3 images"): SynthFaces(3)[3]
    with pytest.raises(TypeError, match="needs a FaceParams"): render({'yaw': 3})
