"""Whether two run directories of the same config trained the same: the SHA-256 of every weight file under
``checkpoints/``, every strategy's validation and test accuracy and each local CNN's (``results.json``), and every
epoch's losses and accuracies (``metrics.jsonl``; times left out). Used to show that a refactor changes nothing
trained or computed: run the same config with the old and the new code, then

    python benchmarks/same_run.py RUN_A RUN_B

Prints each difference (or the counts compared) and exits 1 when anything differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

TIMES = ("seconds", "gather_seconds", "setup_seconds", "measured_seconds", "critical_path_seconds")


def weights(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((run / "checkpoints").rglob("*.safetensors"))}


def accuracies(run: Path) -> dict[str, object]:
    results = json.loads((run / "results.json").read_text())
    out: dict[str, object] = {f"{name}.{key}": entry.get(key) for name, entry in results["strategies"].items()
                              for key in ("val_accuracy", "test_accuracy")}
    out["local.test_accuracy"] = (results.get("local") or {}).get("test_accuracy")
    return out


def epochs(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMES} for r in records if "epoch" in r and "event" not in r]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args()
    differ = 0
    for what, read in (("weight file", weights), ("accuracy", accuracies)):
        a, b = read(args.a), read(args.b)
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                differ += 1
                print(f"{what} {key}: {a.get(key)} != {b.get(key)}")
        print(f"{len(a)} {what} values compared" + (" (SHA-256)" if what == "weight file" else ""))
    ea, eb = epochs(args.a), epochs(args.b)
    if ea != eb:
        differ += 1
        print("the epochs' losses and accuracies differ")
    print(f"{len(ea)} epoch records compared (losses, accuracies, learning rates)")
    print("identical" if not differ else f"{differ} difference(s)")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
