"""Write src/slimtorch/zoo/manifest.json: sha256, parameter count and FP metrics of every zoo model.

    python scripts/make_manifest.py            # all models, full evaluation on the CPU

The metrics are exactly what ``slimtorch eval MODEL`` prints.
"""

import json
import sys

from slimtorch.eval import evaluate
from slimtorch.io.checkpoint import atomic_write_bytes, sha256_file
from slimtorch.zoo import ZOO
from slimtorch.zoo.registry import MANIFEST_FILE, manifest


def main(names: list[str]) -> None:
    rows = json.loads(MANIFEST_FILE.read_text()) if MANIFEST_FILE.is_file() else {}
    for name in names or list(ZOO):
        entry = ZOO[name]
        path = entry.weights_path()
        rows[name] = {"sha256": sha256_file(path), "weights_bytes": path.stat().st_size}
        atomic_write_bytes(MANIFEST_FILE, (json.dumps(rows, indent=2, sort_keys=True) + "\n").encode())
        manifest.cache_clear()
        res = evaluate(name)
        rows[name].update({"params": res.params, "dataset": res.dataset,
                           "fp_metrics": {m.name: round(m.value, 6) for m in res.metrics}})
        atomic_write_bytes(MANIFEST_FILE, (json.dumps(rows, indent=2, sort_keys=True) + "\n").encode())
        print(name, rows[name], flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
