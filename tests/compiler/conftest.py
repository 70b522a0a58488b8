import os
import sys

# the hand-written ONNX builder used by the compiler tests
sys.path.insert(0, os.path.dirname(__file__))
