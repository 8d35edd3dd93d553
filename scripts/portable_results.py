"""Make committed run files portable: record the model by name, and the command without this machine's paths.

    python scripts/portable_results.py [results]

Runs made before models were recorded by name hold the absolute path of the
embedded base's folder (``train_config.model_name``) and of the installed
``hybrid-lora`` program (``command``). This rewrites, in every config.json and
metrics.json under the folder: a model_name that is a path ending in
``hybrid_lora/assets/tiny-gpt2`` becomes ``embedded``; a command whose first
entry is an absolute path becomes ``hybrid-lora`` followed by the arguments;
and a train_config without ``scale_rule`` gets ``alpha/r``, the only rule the
code had then. Nothing else changes. Files are rewritten atomically.
"""

import json
import os
import sys
from pathlib import Path

EMBEDDED_SUFFIX = ("hybrid_lora", "assets", "tiny-gpt2")


def _portable_config(config):
    changed = False
    name = config.get("model_name")
    if isinstance(name, str) and Path(name).is_absolute() and Path(name).parts[-3:] == EMBEDDED_SUFFIX:
        config["model_name"] = "embedded"
        changed = True
    if "scale_rule" not in config:
        config["scale_rule"] = "alpha/r"
        changed = True
    return changed


def make_portable(path):
    """Rewrite one JSON file in place; True if anything changed."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    changed = False
    for key in ("train_config", "config"):
        if isinstance(data.get(key), dict) and "model_name" in data[key]:
            changed |= _portable_config(data[key])
    command = data.get("command")
    if isinstance(command, list) and command and Path(str(command[0])).is_absolute():
        data["command"] = ["hybrid-lora", *command[1:]]
        changed = True
    if changed:
        tmp = Path(path).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return changed


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0] if argv else Path(__file__).resolve().parents[1] / "results")
    for path in sorted(root.rglob("*.json")):
        if path.name in ("config.json", "metrics.json") and make_portable(path):
            print(f"rewrote {path}")


if __name__ == "__main__":
    main()
