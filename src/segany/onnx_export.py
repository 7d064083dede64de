"""Old name of :mod:`segany.onnx.export`, kept while code still imports it from here.

Importing ``segany.onnx_export`` gives the module ``segany.onnx.export`` itself (the same
object, so that changing one of its names changes it for every caller). New code imports
``segany.onnx.export``.
"""

import sys

from .onnx import export

sys.modules[__name__] = export
