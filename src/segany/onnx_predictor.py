"""Old name of :mod:`segany.onnx.predictor`, kept while code still imports it from here.

Importing ``segany.onnx_predictor`` gives the module ``segany.onnx.predictor`` itself (the same
object, so that changing one of its names changes it for every caller). New code imports
``segany.onnx.predictor``.
"""

import sys

from .onnx import predictor

sys.modules[__name__] = predictor
