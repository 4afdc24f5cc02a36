"""Passes declare what they need; the compiler inserts the built-in providers where they must run."""

from __future__ import annotations

from q4c.config import CompileOptions
from q4c.pipeline import Artifact
from q4c.registry import complete_pipeline


def test_the_form_choice_is_inserted_before_the_first_pass_that_reads_forms():
    names = ["fold-constants", "assign-precision", "quantize-weights", "lower-ort-kernels"]
    assert complete_pipeline(names, CompileOptions()) == [
        "fold-constants", "assign-precision", "choose-kernels", "quantize-weights", "lower-ort-kernels"]
    # already there: left where the user put it
    names = ["assign-precision", "choose-kernels", "quantize-weights"]
    assert complete_pipeline(names, CompileOptions()) == names


def test_int8_activations_bring_their_qdq_pass_and_its_calibration():
    names = ["fold-constants", "measure-sensitivity", "assign-precision", "quantize-weights"]
    wanted = frozenset({Artifact.CALIBRATION})
    assert complete_pipeline(names, CompileOptions(activations="int8"), wanted) == [
        "fold-constants", "calibrate", "measure-sensitivity", "assign-precision", "choose-kernels",
        "insert-activation-qdq", "quantize-weights"]
    # without a table wanted up front, the calibration lands right before the pass that reads it
    assert complete_pipeline(["assign-precision", "quantize-weights"], CompileOptions(activations="int8")) == [
        "assign-precision", "calibrate", "choose-kernels", "insert-activation-qdq", "quantize-weights"]
    assert "insert-activation-qdq" not in complete_pipeline(names, CompileOptions())


def test_a_wanted_table_without_analyses_is_made_at_the_end():
    assert complete_pipeline(["fold-constants"], CompileOptions(), frozenset({Artifact.CALIBRATION})) == [
        "fold-constants", "calibrate"]
