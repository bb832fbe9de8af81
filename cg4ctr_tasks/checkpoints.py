"""Our small torch models' folders: ``config.json`` (a dataclass) + ``model.safetensors``.

The same layout as transformers' ``save_pretrained``, so a folder is self-describing, loads
without pickle and works on any fsspec URL (staged locally, config written last as the marker
of a complete save).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, TypeVar

from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from cg4ctr_tasks import storage
from cg4ctr_tasks.errors import UserError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
C = TypeVar("C")


def save_checkpoint(module: nn.Module, config: Any, url: str) -> None:
    """Write ``config`` (a dataclass) and the module's weights into the folder ``url``."""
    text = json.dumps(asdict(config), indent=2, sort_keys=True)
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    with storage.staged_dir(url, last=CONFIG_NAME) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME))
        (tmp / CONFIG_NAME).write_text(text, "utf-8")


def load_checkpoint(url: str, config_type: type[C], what: str, hint: str = "") -> tuple[C, Any]:
    """(config, weights) from the folder ``url``; a clear error names what is wrong."""
    config_url, weights_url = storage.join(url, CONFIG_NAME), storage.join(url, WEIGHTS_NAME)
    if not (storage.exists(config_url) and storage.exists(weights_url)):
        raise UserError(f"no {what} in {url} ({CONFIG_NAME} + {WEIGHTS_NAME}){hint}")
    try:
        config = config_type(**json.loads(storage.read_bytes(config_url)))
    except (TypeError, ValueError) as exc:
        raise UserError(f"{url}: invalid {what} config ({exc})") from None
    return config, load_safetensors(storage.read_bytes(weights_url))
