"""The worker scripts' shared toy problem (``_scripts/toy.py``) is importable by the tests too."""
import sys
from pathlib import Path

_SCRIPTS = str(Path(__file__).parent / "_scripts")
if _SCRIPTS not in sys.path:
    sys.path.insert(0, _SCRIPTS)
