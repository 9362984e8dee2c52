"""`import advgraph` / `import advgraph.integrations` import no framework."""

from __future__ import annotations

import json
import subprocess
import sys

FRAMEWORKS = ("torch", "tensorflow", "keras", "transformers", "accelerate", "lightning", "pytorch_lightning")


def test_integrations_package_imports_no_framework():
    code = (
        "import json, sys; import advgraph, advgraph.integrations; "
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({FRAMEWORKS!r}))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
