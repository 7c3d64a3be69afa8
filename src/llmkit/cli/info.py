"""`llmkit info [PATH]`: environment, or a model folder's family, parameter count and config."""

from __future__ import annotations

import argparse
import json
import platform


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show the environment, or a model folder's family, size and config")
    p.add_argument("path", nargs="?", help="a Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import llmkit

    if args.path is None:
        print(f"llmkit {llmkit.__version__}  torch {torch.__version__}  python {platform.python_version()}")
        print(f"threads {torch.get_num_threads()}  cuda {torch.cuda.is_available()}"
              + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
        return 0
    model = llmkit.load_model(args.path)
    cfg = model.config
    info = {"path": args.path, "family": cfg.model_type, "parameters": model.num_params(),
            "config": {k: v for k, v in cfg.to_dict().items() if k != "extra"}}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"family      {cfg.model_type}")
    print(f"parameters  {info['parameters']:,} ({info['parameters'] / 1e6:.2f}M)")
    print("config")
    for k, v in info["config"].items():
        print(f"  {k:22s} {v}")
    return 0
