from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Prefect's ephemeral API server (the CLI's, in subprocesses) gets 20 s to start by default; a loaded
# 2-core CI machine needs more (helpers.prefect_harness does the same for in-process flows)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "240")
# keep the hash cache of test runs out of the user's ~/.cache
os.environ["MERGEFLOW_CACHE_DIR"] = tempfile.mkdtemp(prefix="mergeflow-test-cache-")
sys.path.insert(0, str(Path(__file__).parent))
