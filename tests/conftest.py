import os
import sys

# Tests see the CPU only and import the NumPy transcription beside them.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
