from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# keep the hash cache of test runs out of the user's ~/.cache
os.environ["MERGEFLOW_CACHE_DIR"] = tempfile.mkdtemp(prefix="mergeflow-test-cache-")
sys.path.insert(0, str(Path(__file__).parent))
